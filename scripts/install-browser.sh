#!/bin/sh
# Install headless Chromium and its WebDriver for the web page's browser test
# (tests/test_web_browser.py). Idempotent: does nothing when both are already on PATH.
# Debian/Ubuntu only (apt); elsewhere install chromium + chromedriver yourself.
set -eu

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "chromium and chromedriver are already installed:"
    echo "  $(command -v chromium)"
    echo "  $(command -v chromedriver)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: apt-get not found. Install Chromium and its matching chromedriver with your" >&2
    echo "system's package manager, so that 'chromium' and 'chromedriver' are on PATH." >&2
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "error: installing chromium needs root, and sudo is not available." >&2
    echo "Run as root: apt-get update && apt-get install -y chromium chromium-driver" >&2
    exit 1
fi

echo "Installing chromium and chromium-driver with apt-get..."
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends \
    chromium chromium-driver

for tool in chromium chromedriver; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "error: $tool is still not on PATH after the install." >&2
        exit 1
    fi
done
echo "Installed: $(command -v chromium), $(command -v chromedriver)"
