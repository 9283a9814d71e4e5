#!/usr/bin/env python3
"""The differential corpus (docs/src/corpus.md), driven by scripts/corpus.sh.

For each program of corpus.toml: fetch its package from its registry (cached in the
target dir; the package's and the module's sha256 must match the pins), run the .wasm
under wasmtime (the reference: its output must hash to the recorded values), then
compile it with `kiln compile` for every target and run the artifact with `kilnd run`
(natively, or under the target profile's qemu-user command) and compare the output
byte for byte (sha256) with wasmtime's. Prints one table row per program and target,
and with --page writes the book's dated page. Exits 1 on any difference the manifest
does not explain (`known_difference`), 2 on a broken set-up.
"""
import argparse
import datetime
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TARGETS = ["x86_64-linux", "aarch64-linux", "riscv64-linux"]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def fail_setup(msg):
    log(f"corpus: {msg}")
    sys.exit(2)


class Program:
    def __init__(self, entry):
        self.name = entry["name"]
        self.language = entry["language"]
        self.package = entry["package"]  # "pypi:NAME==VERSION" or "npm:NAME@VERSION"
        self.package_sha256 = entry["package_sha256"]
        self.wasm = entry["wasm"]
        self.wasm_sha256 = entry["wasm_sha256"]
        self.quick = entry.get("quick", False)
        self.runs = entry.get("runs", "")
        self.guest_dir = entry.get("guest_dir", "/work")
        self.inputs = entry.get("inputs", [])
        self.extract = entry.get("extract", [])
        self.mkdir = entry.get("mkdir", [])
        self.args = entry.get("args", [])
        self.stdin = entry.get("stdin")
        self.outputs = entry.get("outputs", [])
        self.exit_code = entry.get("exit_code", 0)
        self.expect = entry.get("expect", {})
        self.known = entry.get("known_difference", {})
        self.timeout = entry.get("timeout", 3600)
        self.fetched = None  # the unpacked package

    def registry(self):
        kind, _, spec = self.package.partition(":")
        return kind, spec

    def fetch(self, cache):
        """Downloads the package once, checks both pins, unpacks it; returns the .wasm."""
        kind, spec = self.registry()
        dl = os.path.join(cache, "packages", self.package_sha256[:16])
        os.makedirs(dl, exist_ok=True)
        files = [f for f in os.listdir(dl) if f.endswith((".whl", ".tgz"))]
        if not files:
            log(f"fetch: {self.package}")
            if kind == "pypi":
                cmd = ["pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", spec, "-d", dl]
                cmd = [sys.executable, "-m"] + cmd
            elif kind == "npm":
                cmd = ["npm", "pack", "--silent", spec, "--pack-destination", dl]
            else:
                fail_setup(f"{self.name}: unknown registry `{kind}`")
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            files = [f for f in os.listdir(dl) if f.endswith((".whl", ".tgz"))]
        if len(files) != 1:
            fail_setup(f"{self.name}: expected one package file in {dl}, found {files}")
        archive = os.path.join(dl, files[0])
        got = sha256_file(archive)
        if got != self.package_sha256:
            fail_setup(f"{self.name}: {files[0]} has sha256 {got}, the manifest pins {self.package_sha256}")
        root = os.path.join(dl, "unpacked")
        if not os.path.isdir(root):
            tmp = root + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            if archive.endswith(".whl"):
                with zipfile.ZipFile(archive) as z:
                    z.extractall(tmp)
            else:
                with tarfile.open(archive) as t:
                    t.extractall(tmp, filter="data")
            os.rename(tmp, root)
        self.fetched = root
        wasm = os.path.join(root, self.wasm)
        got = sha256_file(wasm)
        if got != self.wasm_sha256:
            fail_setup(f"{self.name}: {self.wasm} has sha256 {got}, the manifest pins {self.wasm_sha256}")
        return wasm

    def prepare(self, into):
        """The directory the module sees at guest_dir, fresh for every run."""
        os.makedirs(into)
        for spec in self.inputs:
            src, _, dst = spec.partition(":")
            shutil.copy(os.path.join(HERE, "inputs", src), os.path.join(into, dst or src))
        for spec in self.extract:
            src, _, dst = spec.partition(":")
            shutil.copytree(os.path.join(self.fetched, src), os.path.join(into, dst))
        for d in self.mkdir:
            os.makedirs(os.path.join(into, d), exist_ok=True)

    def digest(self, stdout, root, code):
        """What a run produced: its exit code and the sha256 of stdout and each output file."""
        out = {"exit_code": code, "stdout": sha256_file(stdout)}
        for name in self.outputs:
            path = os.path.join(root, name)
            out[name] = sha256_file(path) if os.path.isfile(path) else "missing"
        return out


def run_wasmtime(prog, wasm, work):
    """The reference run, in-process with wasmtime's PyPI embedding."""
    import wasmtime

    root = os.path.join(work, "wasmtime-root")
    prog.prepare(root)
    cfg = wasmtime.WasiConfig()
    cfg.argv = [prog.name] + prog.args
    cfg.preopen_dir(root, prog.guest_dir)
    if prog.stdin:
        cfg.stdin_file = os.path.join(HERE, "inputs", prog.stdin)
    stdout, stderr = os.path.join(work, "wasmtime.out"), os.path.join(work, "wasmtime.err")
    cfg.stdout_file, cfg.stderr_file = stdout, stderr
    start = time.monotonic()
    engine = wasmtime.Engine()
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    store.set_wasi(cfg)
    try:
        module = wasmtime.Module.from_file(engine, wasm)
        linker.instantiate(store, module).exports(store)["_start"](store)
        code = 0
    except wasmtime.ExitTrap as e:
        code = e.code
    except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
        code = "trap: " + str(e).splitlines()[0]
    seconds = time.monotonic() - start
    return prog.digest(stdout, root, code), seconds, stderr


def qemu_prefix(target, native_arch):
    with open(os.path.join(REPO, "targets", target + ".toml"), "rb") as f:
        profile = tomllib.load(f)
    if profile["triple"].split("-")[0].startswith(native_arch):
        return profile["triple"], []
    return profile["triple"], profile.get("qemu", [])


def run_kiln(prog, wasm, target, env, work):
    """kiln compile + kilnd run for one target; returns (row, digest, stderr path)."""
    triple, qemu = qemu_prefix(target, platform.machine())
    kilnd = os.path.join(env.target_dir, triple, "release", "kilnd")
    if not os.path.exists(kilnd):
        fail_setup(f"{kilnd} is missing: build it with scripts/build.sh")
    artifact = os.path.join(env.cache, "artifacts", f"{prog.name}-{target}.kiln")
    os.makedirs(os.path.dirname(artifact), exist_ok=True)
    compile_cmd = [env.kiln, "compile", wasm, "--target", target, "--sign", env.key,
                   "--name", prog.name, "-o", artifact]
    # Large modules take minutes on a small machine: leave the cores to interactive work.
    if os.path.getsize(wasm) > 16 << 20:
        compile_cmd = ["nice", "-n", "10"] + compile_cmd
    start = time.monotonic()
    c = subprocess.run(compile_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    compile_s = time.monotonic() - start
    if c.returncode != 0:
        err = os.path.join(work, f"compile-{target}.err")
        with open(err, "w") as f:
            f.write(c.stderr)
        return {"compile_s": compile_s, "size": None, "run_s": None}, {"exit_code": f"compile failed ({c.returncode})"}, err
    root = os.path.join(work, f"root-{target}")
    prog.prepare(root)
    stdout, stderr = os.path.join(work, f"{target}.out"), os.path.join(work, f"{target}.err")
    cmd = qemu + [kilnd, "run", artifact, "--trust", env.pub, "--dir", f"{root}:{prog.guest_dir}", "--"] + prog.args
    stdin = open(os.path.join(HERE, "inputs", prog.stdin), "rb") if prog.stdin else subprocess.DEVNULL
    run_env = {k: v for k, v in os.environ.items() if k != "KILN_LOG"}
    start = time.monotonic()
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        try:
            r = subprocess.run(cmd, stdin=stdin, stdout=out, stderr=err, env=run_env, timeout=prog.timeout)
            code = r.returncode
        except subprocess.TimeoutExpired:
            code = f"timed out after {prog.timeout} s"
    run_s = time.monotonic() - start
    if stdin is not subprocess.DEVNULL:
        stdin.close()
    digest = prog.digest(stdout, root, code)
    with open(stderr, "rb") as f:
        text = f.read().decode(errors="replace")
    if "trapped" in text:  # kilnd exits with its own code; say why in the row
        digest["exit_code"] = f"{code}: " + next(line for line in text.splitlines() if "trapped" in line).strip()
    return {"compile_s": compile_s, "size": os.path.getsize(artifact), "run_s": run_s}, digest, stderr


def fmt_s(s):
    return "-" if s is None else (f"{s:.1f} s" if s < 100 else f"{s:.0f} s")


def fmt_mb(n):
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def tail(path, lines=8):
    try:
        with open(path, "rb") as f:
            text = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def why(stderr):
    """kilnd's own error or trap line, if it printed one."""
    try:
        with open(stderr, "rb") as f:
            text = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    return next((line.strip()[:300] for line in text if "kilnd: error" in line or "trapped" in line), None)


def describe(digest, expected):
    wrong = [k for k in expected if digest.get(k) != expected[k]]
    if not wrong:
        return None
    parts = []
    for k in wrong:
        if k == "exit_code":
            parts.append(f"exit {digest.get(k)} (expected {expected[k]})")
        else:
            parts.append(f"{k} {str(digest.get(k))[:12]} (expected {str(expected[k])[:12]})")
    return "; ".join(parts)


def machine_lines(env):
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    out = [f"machine: {platform.machine()} ({os.cpu_count()} cores), Linux {platform.release()}; {cpu}"]
    kiln_v = subprocess.run([env.kiln, "--version"], capture_output=True, text=True).stdout.strip()
    out.append(f"{kiln_v} ({env.kiln_profile} build), wasmer 7.4.2 with Cranelift; reference: wasmtime {env.wasmtime_version} (PyPI embedding)")
    for q in ("qemu-aarch64", "qemu-riscv64"):
        v = subprocess.run([q, "--version"], capture_output=True, text=True).stdout.splitlines()
        out.append(v[0] if v else f"{q}: not found")
    out.append("load average when it started (1, 5, 15 min): " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return out


def write_page(env, programs, rows, wasmtime_rows, notes, command, started):
    day = started.strftime("%Y-%m-%d")
    name = f"corpus-{day}.md"
    book = os.path.join(REPO, "docs", "src")
    lines = [f"# Measurements of {day}: the differential corpus", "",
             f"Written by `{command}` at {started.strftime('%Y-%m-%d %H:%M')} UTC from its own output: "
             "the tables below are the script's, not edited by hand. What the corpus is and how it is "
             "checked: [The differential corpus](../corpus.md). Figures under qemu-user measure the "
             "emulator, not a board: compare ratios there.", ""]
    lines += [f"- {line}" for line in env.machine]
    lines += ["", "## The programs", "",
              "| program | language | package | module | what it runs |", "|---|---|---|---|---|"]
    for p in programs:
        size = os.path.getsize(os.path.join(p.fetched, p.wasm))
        lines.append(f"| {p.name} | {p.language} | {p.package} | `{p.wasm}`, {fmt_mb(size)} | {p.runs} |")
    lines += ["", "## wasmtime, the reference (x86_64, compile and run)", "",
              "| program | time | exit | stdout sha256 | against the recorded hashes |", "|---|---|---|---|---|"]
    for prog_name, seconds, digest, verdict in wasmtime_rows:
        lines.append(f"| {prog_name} | {fmt_s(seconds)} | {digest['exit_code']} | `{digest['stdout'][:16]}` | {verdict} |")
    lines += ["", "## kiln per target", "",
              "`compile` is `kiln compile` (wall clock, every core); `run` is `kilnd run` from start to "
              "exit, verification and loading included; `result` compares exit code, stdout and output "
              "files byte for byte with wasmtime's.", "",
              "| program | target | mode | compile | artifact | run | result |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['program']} | {r['target']} | {r['mode']} | {fmt_s(r['compile_s'])} | "
                     f"{fmt_mb(r['size'])} | {fmt_s(r['run_s'])} | {r['result']} |")
    if notes:
        lines += ["", "## Differences", ""] + [f"- {n}" for n in notes]
    with open(os.path.join(book, "measurements", name), "w") as f:
        f.write("\n".join(lines) + "\n")
    entry = f"  - [{day}: corpus](measurements/{name})"
    summary = os.path.join(book, "SUMMARY.md")
    with open(summary) as f:
        text = f.read().splitlines()
    if entry not in text:
        at = next(i for i, line in enumerate(text) if line.endswith("](measurements.md)"))
        text.insert(at + 1, entry)
        with open(summary, "w") as f:
            f.write("\n".join(text) + "\n")
    listing = os.path.join(book, "measurements.md")
    with open(listing) as f:
        text = f.read().splitlines()
    item = f"- [{day}: corpus](measurements/{name}): the differential corpus (scripts/corpus.sh)"
    if item not in text:
        at = next(i for i, line in enumerate(text) if line.startswith("<!-- bench pages"))
        text.insert(at + 1, item)
        with open(listing, "w") as f:
            f.write("\n".join(text) + "\n")
    log(f"corpus: wrote docs/src/measurements/{name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the programs marked quick")
    ap.add_argument("--only", help="comma-separated program names")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--page", action="store_true", help="write docs/src/measurements/corpus-DATE.md")
    ap.add_argument("--record", action="store_true",
                    help="print wasmtime's hashes as `expect` tables for the manifest instead of checking them")
    ap.add_argument("--no-kiln", action="store_true", help="wasmtime only")
    ap.add_argument("--kiln", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--target-dir", required=True)
    ap.add_argument("--command", default="scripts/corpus.sh")
    a = ap.parse_args()

    with open(os.path.join(HERE, "corpus.toml"), "rb") as f:
        programs = [Program(e) for e in tomllib.load(f)["program"]]
    if a.quick:
        programs = [p for p in programs if p.quick]
    if a.only:
        names = a.only.split(",")
        unknown = set(names) - {p.name for p in programs}
        if unknown:
            fail_setup(f"no such program: {', '.join(sorted(unknown))}")
        programs = [p for p in programs if p.name in names]
    targets = a.targets.split(",")

    import wasmtime  # noqa: F401  (fail early, before any download)
    from importlib.metadata import version

    env = argparse.Namespace(kiln=a.kiln, key=a.key, pub=os.path.splitext(a.key)[0] + ".pub",
                             cache=a.cache, target_dir=a.target_dir, wasmtime_version=version("wasmtime"),
                             kiln_profile=os.path.basename(os.path.dirname(a.kiln)))
    started = datetime.datetime.now(datetime.timezone.utc)
    env.machine = machine_lines(env)
    for line in env.machine:
        log(line)

    rows, wasmtime_rows, notes, failures = [], [], [], []
    print("| program | target | mode | compile | artifact | run | result |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for prog in programs:
        wasm = prog.fetch(a.cache)
        work = tempfile.mkdtemp(prefix=f"corpus-{prog.name}-", dir=os.path.join(a.cache))
        log(f"{prog.name}: wasmtime ({os.path.getsize(wasm) / 1e6:.1f} MB module)")
        ref, seconds, ref_err = run_wasmtime(prog, wasm, work)
        expected = dict(prog.expect)
        expected["exit_code"] = prog.exit_code
        if a.record:
            print(f"# {prog.name}: exit {ref['exit_code']}\n[program.expect]")
            for k, v in ref.items():
                if k != "exit_code":
                    print(f'"{k}" = "{v}"')
            verdict = "recorded"
        else:
            wrong = describe(ref, expected)
            verdict = "match" if wrong is None else f"**differ**: {wrong}"
            if wrong:
                failures.append(f"{prog.name}: wasmtime's output is not the recorded one: {wrong}\n{tail(ref_err)}")
        wasmtime_rows.append((prog.name, seconds, ref, verdict))
        print(f"| {prog.name} | wasmtime | x86_64 | - | - | {fmt_s(seconds)} | {verdict} |", flush=True)
        if a.no_kiln:
            shutil.rmtree(work, ignore_errors=True)
            continue
        for target in targets:
            log(f"{prog.name}: kiln compile + kilnd run for {target}")
            stats, got, err = run_kiln(prog, wasm, target, env, work)
            _, qemu = qemu_prefix(target, platform.machine())
            wrong = describe(got, ref)
            if wrong is not None and why(err):
                wrong += f"; {why(err)}"
            if wrong is None:
                result = "agree"
            elif target in prog.known:
                result = f"differ (known: {prog.known[target]})"
                notes.append(f"{prog.name} on {target}: {wrong}; known: {prog.known[target]}")
            else:
                result = f"**differ**: {wrong}"
                failures.append(f"{prog.name} on {target}: {wrong}\n{tail(err)}")
                notes.append(f"{prog.name} on {target}: {wrong} (`kilnd run ... --dir ROOT:{prog.guest_dir} -- "
                             f"{shlex.join(prog.args)}`)")
            row = dict(stats, program=prog.name, target=target, mode="qemu-user" if qemu else "native", result=result)
            rows.append(row)
            print(f"| {prog.name} | {target} | {row['mode']} | {fmt_s(row['compile_s'])} | {fmt_mb(row['size'])} "
                  f"| {fmt_s(row['run_s'])} | {result} |", flush=True)
            if result == "agree":  # a differing artifact stays for the reproduction
                os.remove(os.path.join(a.cache, "artifacts", f"{prog.name}-{target}.kiln"))
        if not failures:
            shutil.rmtree(work, ignore_errors=True)

    if a.page:
        write_page(env, programs, rows, wasmtime_rows, notes, a.command, started)
    for f in failures:
        log(f"corpus: FAILED {f}")
    agreed = sum(1 for r in rows if r["result"] == "agree")
    print(f"corpus: {agreed} of {len(rows)} kiln runs agree with wasmtime", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
