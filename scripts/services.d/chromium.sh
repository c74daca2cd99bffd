# Headless Chromium and its WebDriver (/usr/bin/chromium, /usr/bin/chromedriver) for the
# browser tests of `runyard ui` (tests/test_ui_browser.py). Sourced by scripts/services.sh;
# see there for the conventions. Nothing runs in the background: the tests start the
# browser themselves, so there is nothing to stop.

chromium_ready() {
  command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1
}

ensure_chromium() {
  if chromium_ready; then
    _log "Chromium and chromedriver are installed ($(chromium --version 2>/dev/null | head -1))"
    return 0
  fi
  command -v apt-get >/dev/null 2>&1 \
    || _die "Chromium is not installed and there is no apt-get to install it: install Debian's chromium and" \
            "chromium-driver packages (or put chromium and chromedriver on PATH)"
  _log "installing Debian's chromium and chromium-driver with apt-get"
  _as_root env DEBIAN_FRONTEND=noninteractive sh -c \
    'apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null' \
    || _die "apt-get install chromium chromium-driver failed (see above)"
  chromium_ready || _die "chromium or chromedriver is still not on PATH after apt-get install"
}

stop_chromium() {
  # Installed packages stay; no browser process belongs to this script.
  return 0
}
