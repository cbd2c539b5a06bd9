#!/bin/sh
# Headless Chromium + its WebDriver for the playground test (tests/served/test_playground.py).
# Idempotent and quiet: nothing happens when both are installed; otherwise Debian's packages are
# installed with apt when we are root or have password-less sudo, else it says what is missing.
set -eu
PKGS="chromium chromium-driver"
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: no apt-get here; install Chromium and chromedriver yourself (or set CI_NO_BROWSER=1)" >&2
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "install_browser: not root; run: sudo apt-get install -y $PKGS (or set CI_NO_BROWSER=1)" >&2
    exit 0
fi
install() {
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PKGS >/dev/null
}
echo "install_browser: installing $PKGS with apt" >&2
# A fresh machine may have no package lists yet: update once and retry.
install 2>/dev/null || { $SUDO apt-get update -qq >/dev/null && install; }
