# Shared by scripts/serve and scripts/test: make .venv with Python >= 3.11.
# Sourced, not run.
find_python() {
    for candidate in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

apt_install() {
    # Debian packages the caller needs; installed only when a command is missing.
    [ "$#" -gt 0 ] || return 0
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_venv() {
    local python
    python=$(find_python)
    if [ ! -x .venv/bin/python ]; then
        if ! "$python" -m venv .venv 2>/dev/null; then
            rm -rf .venv
            apt_install python3-venv
            "$python" -m venv .venv
        fi
        .venv/bin/python -m pip install -q --upgrade pip
    fi
}
