#!/usr/bin/env bash
# Debian packages the tests start for real: headless Chromium (the status page's screenshots), a Prometheus
# server that scrapes /metrics (tests/test_status_page.py), and curl, which the docs' commands use
# (tests/test_docs_commands.py). Sourced by tests/run.sh so that it alone sets up a fresh machine; installs with
# apt-get only what is missing, and does nothing when all are on PATH.
# Without root or apt-get it prints the command to run and fails: the tests need these and do not skip.
system_packages=()
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || system_packages+=(chromium)
command -v prometheus >/dev/null && command -v promtool >/dev/null || system_packages+=(prometheus)
command -v curl >/dev/null || system_packages+=(curl)
if ((${#system_packages[@]})); then
  install_cmd="apt-get update && apt-get install -y --no-install-recommends ${system_packages[*]}"
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian packages the tests need: ${system_packages[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${system_packages[@]}"
  else
    if command -v apt-get >/dev/null; then why="not root"; else why="no apt-get here"; fi
    echo "[setup] missing ${system_packages[*]} ($why): as root run '$install_cmd'," \
      "or put them on PATH with your package manager, then run bash tests/run.sh again" >&2
    return 1 2>/dev/null || exit 1  # sourced: fail the caller (set -e); run directly: exit
  fi
fi
unset system_packages install_cmd why
