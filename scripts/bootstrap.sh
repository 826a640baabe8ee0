#!/usr/bin/env bash
# Install what Passerelle's demo and tests need on a fresh Debian machine. Idempotent: on a
# machine that has everything it only checks (a few seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PATH="$PATH:/usr/sbin:/sbin"

packages=()
command -v dovecot >/dev/null 2>&1 || packages+=(dovecot-imapd dovecot-lmtpd)
command -v postfix >/dev/null 2>&1 || packages+=(postfix)
command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 \
    || packages+=(postgresql)
command -v make >/dev/null 2>&1 || packages+=(make)
# The systemd unit example is checked offline (tests/unit/test_systemd_unit.py).
command -v systemd-analyze >/dev/null 2>&1 || packages+=(systemd)
# The SMTP TLS tests make a throw-away certificate with the openssl command.
command -v openssl >/dev/null 2>&1 || packages+=(openssl)
# The mail-authentication rig runs the real milters (tests/integration/test_mail_auth_rig.py);
# publicsuffix gives opendmarc its Public Suffix List.
command -v opendkim >/dev/null 2>&1 && command -v opendmarc >/dev/null 2>&1 \
    || packages+=(opendkim opendkim-tools opendmarc)
[ -f /usr/share/publicsuffix/public_suffix_list.dat ] || packages+=(publicsuffix)
command -v unshare >/dev/null 2>&1 || packages+=(util-linux)
if [ ${#packages[@]} -gt 0 ]; then
    echo "bootstrap: installing ${packages[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}"
fi

if ! "$PYTHON" - <<'PY' 2>/dev/null
import importlib.metadata as m, sys
need = ["passerelle", "matrix-synapse", "pytest-asyncio", "schemathesis", "mypy", "ruff", "dnslib", "build", "rich"]
sys.exit(0 if all(m.version(n) for n in need) else 1)
PY
then
    echo "bootstrap: pip install -e '.[test]'"
    "$PYTHON" -m pip install -q --disable-pip-version-check -e '.[test]'
else
    # Already there: refresh the editable install quietly so new dependencies are picked up.
    "$PYTHON" -m pip install -q --disable-pip-version-check -e '.[test]' >/dev/null
fi
