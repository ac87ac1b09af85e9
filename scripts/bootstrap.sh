#!/usr/bin/env bash
# Installs everything the lab and its tests need on a fresh Debian machine (run as root):
# the independent peers (Samba's smbclient, rpcclient and smbtorture, and smbd for the
# conformance and bench comparisons; tshark; Chromium with its driver for the browser tests),
# MIT Kerberos for the lab's KDC, and its headers, a compiler and Python's headers for
# python-gssapi (it builds from source on Linux), and this package with its
# test extras. Safe to run again: apt runs only when something is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES="smbclient samba-common-bin samba samba-testsuite tshark chromium chromium-driver
  krb5-kdc krb5-admin-server krb5-user libkrb5-dev gcc python3-dev"
# One command each package brings, to tell whether it is there.
TOOLS="smbclient rpcclient smbd smbtorture tshark chromium chromedriver krb5kdc kdb5_util
  kadmin.local kinit krb5-config gcc python3-config"

have() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ]; }

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=""
  for tool in $TOOLS; do have "$tool" || need=1; done
  if [ -n "$need" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # tshark asks whether non-root users may capture; answer no without a prompt.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    # krb5-config asks for a default realm: the lab writes its own krb5.conf, so leave it empty.
    echo "krb5-config krb5-config/default_realm string" | debconf-set-selections
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $PACKAGES </dev/null
  fi
else
  echo "bootstrap: not root or no apt-get: install $PACKAGES yourself" >&2
fi

python3 -m pip install -q --disable-pip-version-check -e ".[test]"
