// Deterministic work for QuickJS: integers, BigInt, floats, strings, regular
// expressions, JSON, collections, closures and exceptions. Prints one line per part.
function sieve(n) {
  const composite = new Uint8Array(n + 1);
  let count = 0, sum = 0;
  for (let i = 2; i <= n; i++) {
    if (composite[i]) continue;
    count++; sum += i;
    for (let j = i * i; j <= n; j += i) composite[j] = 1;
  }
  return [count, sum];
}
print("sieve", sieve(200000).join(" "));

let a = 0n, b = 1n;
for (let i = 0; i < 300; i++) [a, b] = [b, a + b];
print("fib300", a.toString(), (a % 1000000007n).toString(16));
print("pow", (3n ** 200n).toString(36));

let x = 0.5, acc = 0;
for (let i = 1; i <= 20000; i++) {
  x = 3.9 * x * (1 - x);
  acc += Math.sin(i) * Math.sqrt(i) / (1 + Math.log(i)) + Math.atan2(x, i) + Math.exp(-x);
}
print("floats", x, acc, acc.toFixed(6), (acc * 1e-7).toExponential(10), Math.fround(acc));
print("hypot", Math.hypot(3, 4, 12), Math.cbrt(-27), Math.pow(2, 0.5), 0.1 + 0.2, 1 / 3, -0, 1e21, 2 ** -1074);

const words = [];
for (let i = 0; i < 2000; i++) words.push(((i * 7919) % 10007).toString(36) + "-" + "kiln".charAt(i % 4));
words.sort((p, q) => (p.length - q.length) || (p < q ? -1 : p > q ? 1 : 0));
print("sort", words.length, words.slice(0, 5).join(","), words.slice(-3).join(","));
const text = words.join(" ");
print("regex", (text.match(/[a-f]+\d-k/g) || []).length, text.replace(/(\w)(\w*)-(\w)/g, "$3$2$1").slice(0, 60));
print("unicode", "Straße ǅ ﬀ İ".toUpperCase(), "ÅΣΑΣ".toLowerCase(), "e\u0301".normalize("NFC").length, [..."😀a"].length);

const obj = { list: [], nested: { pi: Math.PI, e: Math.E, s: "quote\"and\\slash\n" } };
for (let i = 0; i < 100; i++) obj.list.push({ id: i, sq: i * i, half: i / 2, tag: i % 3 ? null : "t" + i });
const json = JSON.stringify(obj);
const back = JSON.parse(json);
print("json", json.length, back.list[77].half, JSON.stringify(back.nested), JSON.stringify(obj, null, 1).length);

const m = new Map(), s = new Set();
for (let i = 0; i < 5000; i++) { m.set("k" + (i % 997), (m.get("k" + (i % 997)) || 0) + i); s.add((i * i) % 1009); }
let msum = 0; for (const [k, v] of m) msum = (msum * 31 + v + k.length) % 1000000007;
print("collections", m.size, s.size, msum);

function counter() { let n = 0; return () => ++n; }
const c = counter(); for (let i = 0; i < 999; i++) c();
let caught = [];
for (const f of [() => null.x, () => { throw new RangeError("r"); }, () => JSON.parse("{"), () => undefinedName, () => 1n + 1]) {
  try { f(); } catch (e) { caught.push(e.name); }
}
print("closures", c(), caught.join(","));

class Shape { area() { return 0; } toString() { return this.constructor.name + "(" + this.area().toFixed(3) + ")"; } }
class Circle extends Shape { constructor(r) { super(); this.r = r; } area() { return Math.PI * this.r * this.r; } }
class Rect extends Shape { constructor(w, h) { super(); this.w = w; this.h = h; } area() { return this.w * this.h; } }
const shapes = []; for (let i = 1; i <= 6; i++) shapes.push(i % 2 ? new Circle(i / 3) : new Rect(i, i / 7));
print("classes", shapes.join(" "), shapes.reduce((t, sh) => t + sh.area(), 0));

function* gen(n) { for (let i = 0; i < n; i++) yield i * i; }
let gsum = 0; for (const v of gen(1000)) gsum += v;
const f64 = new Float64Array([1.5, -2.25, Math.PI]); const u8 = new Uint8Array(f64.buffer);
print("typed", gsum, Array.from(u8.slice(16)).join("."), new DataView(f64.buffer).getUint32(4, true));
print("dates", new Date(Date.UTC(2026, 11, 6, 12, 30)).toISOString(), new Date(0).getTime());
