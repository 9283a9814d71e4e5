;; A WASI command that counts and sums the primes below 1,000,000 with a sieve in
;; linear memory, prints them, and exits 0. Pure compute plus fd_write: the same
;; answer on every target is the point.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 17)  ;; 1 MiB sieve + scratch

  ;; scratch layout: 0..8 iovec, 16..48 digits, 64.. text
  (data (i32.const 64) "primes below 1000000: ")   ;; 22 bytes
  (data (i32.const 96) ", sum ")                    ;; 6 bytes
  (data (i32.const 112) "\n")

  (global $limit i32 (i32.const 1000000))
  (global $sieve i32 (i32.const 65536))

  (func $print (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))

  ;; prints an unsigned 64-bit number in decimal
  (func $print_u64 (param $n i64)
    (local $p i32)
    (local.set $p (i32.const 48))
    (loop $digits
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p)
        (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $n) (i64.const 10)))))
      (local.set $n (i64.div_u (local.get $n) (i64.const 10)))
      (br_if $digits (i64.ne (local.get $n) (i64.const 0))))
    (call $print (local.get $p) (i32.sub (i32.const 48) (local.get $p))))

  (func $_start (export "_start")
    (local $i i32) (local $j i32) (local $count i64) (local $sum i64)
    ;; sieve[i] = 1 means composite (memory starts zeroed)
    (local.set $i (i32.const 2))
    (block $done
      (loop $outer
        (br_if $done (i32.ge_u (i32.mul (local.get $i) (local.get $i)) (global.get $limit)))
        (if (i32.eqz (i32.load8_u (i32.add (global.get $sieve) (local.get $i))))
          (then
            (local.set $j (i32.mul (local.get $i) (local.get $i)))
            (block $inner_done
              (loop $inner
                (br_if $inner_done (i32.ge_u (local.get $j) (global.get $limit)))
                (i32.store8 (i32.add (global.get $sieve) (local.get $j)) (i32.const 1))
                (local.set $j (i32.add (local.get $j) (local.get $i)))
                (br $inner)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $outer)))
    (local.set $i (i32.const 2))
    (block $counted
      (loop $count_loop
        (br_if $counted (i32.ge_u (local.get $i) (global.get $limit)))
        (if (i32.eqz (i32.load8_u (i32.add (global.get $sieve) (local.get $i))))
          (then
            (local.set $count (i64.add (local.get $count) (i64.const 1)))
            (local.set $sum (i64.add (local.get $sum) (i64.extend_i32_u (local.get $i))))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $count_loop)))
    (call $print (i32.const 64) (i32.const 22))
    (call $print_u64 (local.get $count))
    (call $print (i32.const 96) (i32.const 6))
    (call $print_u64 (local.get $sum))
    (call $print (i32.const 112) (i32.const 1))
    (call $proc_exit (i32.const 0)))
)
