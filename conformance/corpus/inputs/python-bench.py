# Deterministic work for CPython: integers, floats, decimal, hashing, compression,
# regular expressions, JSON, unicode, data classes and exceptions. One line per part.
import dataclasses, decimal, fractions, hashlib, heapq, itertools, json, math, re, struct, sys, unicodedata, zlib, collections

print("version", sys.version_info[:3], sys.platform)

def sieve(n):
    flags = bytearray([1]) * (n + 1)
    flags[0:2] = b"\0\0"
    for i in range(2, int(n ** 0.5) + 1):
        if flags[i]:
            flags[i * i :: i] = bytes(len(range(i * i, n + 1, i)))
    return [i for i, f in enumerate(flags) if f]
primes = sieve(300000)
print("sieve", len(primes), sum(primes), primes[-3:])

print("bigint", pow(3, 1000, 10**40 + 7), len(str(math.factorial(1000))), hex(2**521 - 1)[-12:])
decimal.getcontext().prec = 60
print("decimal", decimal.Decimal(2).sqrt(), decimal.Decimal(1) / decimal.Decimal(7))
print("fraction", sum(fractions.Fraction(1, k) for k in range(1, 60)))

x, acc = 0.5, 0.0
for i in range(1, 30001):
    x = 3.9 * x * (1 - x)
    acc += math.sin(i) * math.sqrt(i) / (1 + math.log(i)) + math.atan2(x, i) + math.exp(-x)
print("floats", repr(x), repr(acc), f"{acc:.6f}", f"{acc:.10e}", math.fsum([0.1] * 10), math.gamma(4.5), math.erf(0.5))
print("struct", struct.pack("<dfiq", math.pi, math.e, -7, 2**40).hex())

data = "".join(f"{i}:{i * i % 97};" for i in range(20000)).encode()
print("hash", hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest(), hashlib.blake2b(data, digest_size=16).hexdigest())
packed = zlib.compress(data, 9)
print("zlib", len(data), len(packed), zlib.crc32(packed), zlib.decompress(packed) == data)

text = " ".join(f"{w}{i}" for i, w in zip(range(3000), itertools.cycle(["kiln", "wasm", "riscv", "aarch", "x86"])))
print("regex", len(re.findall(r"\b(?:kiln|wasm)\d*5\b", text)), re.sub(r"([a-z]+)(\d+)", r"\2\1", text)[:60])
print("unicode", "Straße ǅ ﬀ".upper(), unicodedata.normalize("NFKD", "ﬁ é Ω")[:8].encode("utf-8").hex(), unicodedata.name("ß"), "ÅΣΑΣ".lower())

obj = {"list": [{"id": i, "sq": i * i, "half": i / 2, "tag": None if i % 3 else f"t{i}"} for i in range(100)],
       "nested": {"pi": math.pi, "s": "quote\"and\\slash\n", "u": "ünï"}}
s = json.dumps(obj, sort_keys=True)
print("json", len(s), json.loads(s)["list"][77]["half"], hashlib.sha1(json.dumps(obj, indent=1).encode()).hexdigest())

@dataclasses.dataclass(order=True)
class Item:
    weight: float
    name: str
items = sorted(Item((i * 7919) % 101 / 7, f"n{i}") for i in range(500))
print("dataclass", items[0], items[-1], heapq.nsmallest(3, (it.weight for it in items)))

caught = []
for f in (lambda: 1 / 0, lambda: [][1], lambda: {}["k"], lambda: int("x"), lambda: undefined_name, lambda: math.sqrt(-1)):
    try:
        f()
    except Exception as e:
        caught.append(type(e).__name__)
print("exceptions", caught)
counts = collections.Counter(c for c in text if c.isalpha())
print("counter", counts.most_common(5), sorted(set(text))[:10])
