#!/usr/bin/env bash
# Install everything vmforge needs on a Debian 12 machine: apt packages and a virtualenv (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
APT_PKGS=(qemu-system-x86 qemu-utils ovmf busybox-static genisoimage cloud-image-utils
          dosfstools mtools debootstrap e2fsprogs openssh-client openssh-server xz-utils
          python3-venv ca-certificates)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
# The image builders read apt's package lists even when nothing is missing.
$SUDO apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
echo "vmforge installed: $(.venv/bin/vmforge --help >/dev/null && echo ok) (.venv/bin/vmforge)"
