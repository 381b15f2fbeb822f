#!/usr/bin/env bash
# System packages the tests need beyond Python: Debian's headless-capable Chromium, its
# driver (/usr/bin/chromedriver) and a font for readable screenshots, for tests/test_browser.py.
# Idempotent and quick: when they are installed already it checks and exits, offline.
set -euo pipefail
PACKAGES=(chromium chromium-driver fonts-liberation)
if dpkg -s "${PACKAGES[@]}" >/dev/null 2>&1 && [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    echo "ci-deps: ${PACKAGES[*]} already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
/usr/bin/chromedriver --version
