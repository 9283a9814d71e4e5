;; Upstream reproducer (Cranelift riscv64, see docs/src/conformance.md, issue 31):
;; fs1 (f9) is callee-saved in the RISC-V psABI, but Cranelift 0.135 treats it as
;; caller-saved. 26 f64 values live at once make `f` use fs1; its prologue saves fs0 and
;; fs6-fs11 only, and the body loads into fs1 (`fld fs1,8(a0)`), so a C or Rust caller
;; holding a double in fs1 across the call gets it back changed.
;;
;; Seen with wasmer 7.4.2's Cranelift (CraneliftCallbacks writes the .s files):
;;   Cranelift::new().callbacks(Some(CraneliftCallbacks::new("dump".into())?))
;;   engine for riscv64gc-unknown-linux-gnu, Module::new(&engine, wasm)
;;   grep -n 'fs1' dump/*/function_0.s
(module (memory 1)
  (func (export "f") (param i32) (result f64)
    (local f64 f64 f64 f64 f64 f64 f64 f64 f64 f64 f64 f64 f64 f64 f64 f64 f64 f64 f64 f64 f64 f64 f64 f64 f64 f64)
    (local.set 1 (f64.load offset=0 (local.get 0))) (local.set 2 (f64.load offset=8 (local.get 0)))
    (local.set 3 (f64.load offset=16 (local.get 0))) (local.set 4 (f64.load offset=24 (local.get 0)))
    (local.set 5 (f64.load offset=32 (local.get 0))) (local.set 6 (f64.load offset=40 (local.get 0)))
    (local.set 7 (f64.load offset=48 (local.get 0))) (local.set 8 (f64.load offset=56 (local.get 0)))
    (local.set 9 (f64.load offset=64 (local.get 0))) (local.set 10 (f64.load offset=72 (local.get 0)))
    (local.set 11 (f64.load offset=80 (local.get 0))) (local.set 12 (f64.load offset=88 (local.get 0)))
    (local.set 13 (f64.load offset=96 (local.get 0))) (local.set 14 (f64.load offset=104 (local.get 0)))
    (local.set 15 (f64.load offset=112 (local.get 0))) (local.set 16 (f64.load offset=120 (local.get 0)))
    (local.set 17 (f64.load offset=128 (local.get 0))) (local.set 18 (f64.load offset=136 (local.get 0)))
    (local.set 19 (f64.load offset=144 (local.get 0))) (local.set 20 (f64.load offset=152 (local.get 0)))
    (local.set 21 (f64.load offset=160 (local.get 0))) (local.set 22 (f64.load offset=168 (local.get 0)))
    (local.set 23 (f64.load offset=176 (local.get 0))) (local.set 24 (f64.load offset=184 (local.get 0)))
    (local.set 25 (f64.load offset=192 (local.get 0))) (local.set 26 (f64.load offset=200 (local.get 0)))
    (f64.const 0)
    (f64.mul (local.get 1) (local.get 2)) f64.add (f64.mul (local.get 2) (local.get 3)) f64.add
    (f64.mul (local.get 3) (local.get 4)) f64.add (f64.mul (local.get 4) (local.get 5)) f64.add
    (f64.mul (local.get 5) (local.get 6)) f64.add (f64.mul (local.get 6) (local.get 7)) f64.add
    (f64.mul (local.get 7) (local.get 8)) f64.add (f64.mul (local.get 8) (local.get 9)) f64.add
    (f64.mul (local.get 9) (local.get 10)) f64.add (f64.mul (local.get 10) (local.get 11)) f64.add
    (f64.mul (local.get 11) (local.get 12)) f64.add (f64.mul (local.get 12) (local.get 13)) f64.add
    (f64.mul (local.get 13) (local.get 14)) f64.add (f64.mul (local.get 14) (local.get 15)) f64.add
    (f64.mul (local.get 15) (local.get 16)) f64.add (f64.mul (local.get 16) (local.get 17)) f64.add
    (f64.mul (local.get 17) (local.get 18)) f64.add (f64.mul (local.get 18) (local.get 19)) f64.add
    (f64.mul (local.get 19) (local.get 20)) f64.add (f64.mul (local.get 20) (local.get 21)) f64.add
    (f64.mul (local.get 21) (local.get 22)) f64.add (f64.mul (local.get 22) (local.get 23)) f64.add
    (f64.mul (local.get 23) (local.get 24)) f64.add (f64.mul (local.get 24) (local.get 25)) f64.add
    (f64.mul (local.get 25) (local.get 26)) f64.add (f64.mul (local.get 26) (local.get 1)) f64.add))
