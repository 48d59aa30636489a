#!/usr/bin/env bash
# Install everything vmforge needs on a Debian 12 machine: apt packages and a virtualenv (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
APT_PKGS=(qemu-system-x86 qemu-utils ovmf busybox-static genisoimage cloud-image-utils
          dosfstools mtools debootstrap e2fsprogs openssh-client openssh-server xz-utils
          python3-venv ca-certificates dnsmasq-base nftables iproute2)
# The libvirt backend: the daemons (started by hand where PID 1 is not systemd: virtlogd -d &&
# libvirtd -d), virsh/virt-xml-validate, setfacl (QEMU's access to owner-only files), and what
# libvirt-python builds against (it has no wheel on PyPI).
APT_PKGS+=(libvirt-daemon-system libvirt-clients libvirt-dev libxml2-utils acl pkg-config gcc
           python3-dev)
# The web console's browser tests (tests/integration/test_web.py): headless Chromium + driver.
APT_PKGS+=(chromium chromium-driver)
# Benchmarks: the tools vmforge is compared with (bench/).
APT_PKGS+=(virtinst)
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
# compat mode: a plain path entry, not an import hook that every command would pay ~8 ms for.
.venv/bin/python -m pip install -q -e '.[test,libvirt]' --config-settings editable_mode=compat
# Without udev (containers, minimal VMs) /dev/kvm stays root-only 0600: libvirt then finds KVM
# when it probes QEMU but not for its QEMU account, and re-probes on every call (a define takes
# about a minute). Give the device the group and group access udev gives it.
if [ -c /dev/kvm ] && getent group kvm >/dev/null &&
   { [ "$(stat -c %G /dev/kvm)" != kvm ] || [ $((0$(stat -c %a /dev/kvm) & 060)) != 48 ]; }
then
  $SUDO chgrp kvm /dev/kvm && $SUDO chmod g+rw /dev/kvm
fi
echo "vmforge installed: $(.venv/bin/vmforge --help >/dev/null && echo ok) (.venv/bin/vmforge)"
