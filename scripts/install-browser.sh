#!/usr/bin/env bash
# Install headless Chromium for the one test that looks at compare.html in a real browser
# (tests/test_eval_compare.py::test_compare_html_renders_in_headless_chromium).
# Installs Debian/Ubuntu's `chromium` package when it is missing and this user may install
# system packages (root, or sudo without a password); otherwise it says what to run and
# returns 0, and that test is skipped with the same command in its reason.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "${DIFFALIGN_NO_BROWSER:-0}" = 1 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: no apt-get here; install Chromium yourself to run the browser test" >&2
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "install-browser: cannot install system packages as $(id -un); run:" >&2
  echo "  sudo apt-get install -y chromium" >&2
  exit 0
fi
echo "install-browser: installing chromium (apt-get, about 1-2 minutes) ..." >&2
start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends chromium >/tmp/diffalign-apt.log 2>&1; then
  # a fresh machine's package lists may be missing or stale
  "${sudo[@]}" apt-get update -q >>/tmp/diffalign-apt.log 2>&1 &&
    "${sudo[@]}" apt-get install -y -q --no-install-recommends chromium >>/tmp/diffalign-apt.log 2>&1
fi
if command -v chromium >/dev/null 2>&1; then
  echo "install-browser: chromium installed in $(( $(date +%s) - start )) s" >&2
else
  echo "install-browser: apt-get could not install chromium (log: /tmp/diffalign-apt.log);" \
       "the browser test will be skipped" >&2
fi
exit 0
