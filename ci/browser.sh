#!/usr/bin/env bash
# Debian's Chromium and its ChromeDriver (the same version), for tests/test_board.py: installed
# with apt where they are missing and this user may (root, apt-get present). --background: start
# the install and return; the test waits for .venv/.browser-done (which holds the outcome).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p .venv
done_file=.venv/.browser-done
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    echo ok > "$done_file"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "not installed: run as root on Debian (apt-get install chromium chromium-driver)" > "$done_file"
    exit 0
fi
if [ "${1:-}" = "--background" ]; then
    rm -f "$done_file"
    nohup bash "$0" > .venv/browser-install.log 2>&1 &
    exit 0
fi
if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        chromium chromium-driver; then
    echo ok > "$done_file"
else
    echo "apt-get install chromium chromium-driver failed (.venv/browser-install.log)" > "$done_file"
fi
