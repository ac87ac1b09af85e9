#!/usr/bin/env bash
# Installs everything the lab and its tests need on a fresh Debian machine (run as root):
# the Samba client tools, Samba's test suite (smbtorture) and tshark used as independent peers,
# Chromium for the HTML report test, and this package with its test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=""
  for tool in smbclient rpcclient smbtorture tshark chromium; do command -v "$tool" >/dev/null || need=1; done
  if [ -n "$need" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # tshark asks whether non-root users may capture; answer no without a prompt.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    apt-get install -y -q --no-install-recommends smbclient samba-common-bin samba-testsuite tshark \
      chromium </dev/null
  fi
else
  echo "bootstrap: not root or no apt-get: install smbclient, samba-common-bin, samba-testsuite, tshark" \
    "and chromium yourself" >&2
fi

python3 -m pip install -q --disable-pip-version-check -e ".[test]"
