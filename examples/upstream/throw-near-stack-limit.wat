;; Upstream reproducer (wasmer 7.4.2, see docs/src/conformance.md, issue 31): a throw
;; when the 1 MiB wasm stack is nearly full hangs instead of trapping. `_start` throws
;; from ever deeper recursion, each throw caught at the top; it must end in `call stack
;; exhausted`, and on x86_64 it never ends (the unwinder and the personality routine run
;; on the wasm stack). riscv64 hangs alike at a fixed depth, but under qemu this walk is
;; too slow to tell a hang from work.
;;
;;   kiln compile throw-near-stack-limit.wat --target x86_64-linux --sign k.key -o t.kiln
;;   timeout 60 kilnd run t.kiln --trust k.pub; echo $?     # 124: still running
(module
  (tag $e)
  (func $rec (param $d i32)
    (if (i32.eqz (local.get $d)) (then (throw $e)))
    (call $rec (i32.sub (local.get $d) (i32.const 1)))
    (nop))
  ;; throw from ever deeper recursion, each caught at the top; the deepest ones run
  ;; out of stack, which must end in `call stack exhausted`
  (func (export "_start")
    (local $d i32)
    (local.set $d (i32.const 32400))
    (loop $deeper
      (block $caught (try_table (catch $e $caught) (call $rec (local.get $d))))
      (local.set $d (i32.add (local.get $d) (i32.const 1)))
      (br $deeper))))
