#!/usr/bin/env bash
# Prepare a Raspberry Pi (64-bit Raspberry Pi OS, Bookworm or later) to be an rpicluster worker:
# system packages, a venv at the path the inventory default expects, rpicluster installed in it.
#
#   bash prepare-pi.sh [--from PIP-SPEC] [--venv DIR] [--check]
#
#   --from SPEC   what pip installs: a checkout ("."), a wheel, or "rpicluster[s3]==0.1.0".
#                 Default: the checkout this script is in (deploy/..), if it is one.
#   --venv DIR    default ~/.venvs/rpicluster (the inventory's default python is DIR/bin/python)
#   --check       only check that this system can run rpicluster; change nothing.
#
# Run it as the user that will run the worker (it calls sudo for apt). The alternative that needs
# no internet on the Pis: `rpicluster up -c cluster.toml --provision` from the desktop.
set -euo pipefail

venv="${HOME}/.venvs/rpicluster"
spec=""
check_only=0
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

die() { echo "prepare-pi: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --from) [ $# -ge 2 ] || die "--from needs a pip requirement or path"; spec="$2"; shift 2 ;;
    --venv) [ $# -ge 2 ] || die "--venv needs a directory"; venv="$2"; shift 2 ;;
    --check) check_only=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) die "unknown option '$1' (known: --from SPEC, --venv DIR, --check)" ;;
  esac
done

# The userland decides, not the kernel: 32-bit Raspberry Pi OS boots a 64-bit kernel on a Pi 4/5,
# so `uname -m` says aarch64 while every package (and Python) is armhf.
arch="$(dpkg --print-architecture 2>/dev/null || uname -m)"
case "$arch" in
  arm64|aarch64|amd64|x86_64) ;;
  armhf|armel|armv7l|armv6l|i386|i686)
    die "this is a 32-bit system ($arch). numpy and scikit-learn publish no armv7/armhf wheels,
so pip would compile them for hours and fail on a Pi's memory. Flash the 64-bit Raspberry Pi OS
(Raspberry Pi Imager: 'Raspberry Pi OS (64-bit)'); a Pi 3, 4 or 5 runs it." ;;
  *) die "unsupported architecture '$arch' (supported: arm64, amd64)" ;;
esac

command -v python3 >/dev/null || die "python3 not found (install Raspberry Pi OS Bookworm or later)"
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  die "python3 is $(python3 -V 2>&1 | cut -d' ' -f2); rpicluster needs 3.11 or later
(Raspberry Pi OS Bookworm has 3.11: upgrade the OS)"
fi
echo "prepare-pi: $arch, $(python3 -V 2>&1): ok"
[ "$check_only" = 1 ] && exit 0

[ "$(id -u)" != 0 ] || die "run as the worker's user, not root (it uses sudo for apt)"

if [ -z "$spec" ]; then
  [ -f "$here/../pyproject.toml" ] || die "no --from given and $here/.. is not an rpicluster checkout"
  spec="$(cd "$here/.." && pwd)"
fi

# python3-venv: the venv; openssh-server: rpicluster reaches workers over SSH; chrony: Pis have
# no real-time clock and TLS certificates need the right time; rsync: copying data stores.
packages=(python3 python3-venv python3-dev openssh-server chrony rsync)
# vcgencmd (temperature, throttling flags on the dashboard): raspi-utils on newer releases.
for candidate in libraspberrypi-bin raspi-utils; do
  if apt-cache show "$candidate" >/dev/null 2>&1; then packages+=("$candidate"); break; fi
done
sudo apt-get update
sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}"
sudo systemctl enable --now ssh

mkdir -p "$(dirname "$venv")"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --upgrade pip
"$venv/bin/python" -m pip install "$spec"
"$venv/bin/python" -c 'import numpy, sklearn, distributed, rpicluster; print("rpicluster", rpicluster.__version__, "numpy", numpy.__version__)'
echo "prepare-pi: done. In the inventory: python = \"$venv/bin/python\""
