# Holdfast — every set-up step lives here. On a fresh Debian machine (as root):
#   make demo   installs what is missing, builds, runs the demo
#   make test   installs what is missing, builds, runs every test, then builds and checks the .deb
#   make deb    builds dist/holdfast_VERSION_ARCH.deb (see "Install" in README.md)
SHELL      := /bin/bash
SWIFT      ?= swift
BUILD_DIR  ?= .build
TSAN_DIR   ?= .build-tsan
SOAK_MINUTES ?= 2
FUZZ_DIR   ?= .build-fuzz
# Seconds per fuzz target for `make fuzz`; `make fuzz-smoke` runs each for 10.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := bridge broker stream config
# Coverage-guided (libFuzzer) and AddressSanitizer on every Swift module; HOLDFAST_FUZZING makes
# holdfast-fuzz's main libFuzzer's driver instead of the replayer.
FUZZ_FLAGS := -Xswiftc -sanitize=fuzzer,address -Xswiftc -DHOLDFAST_FUZZING
# The package's release build: its own scratch dir (other flags than `make release`).
DEB_BUILD_DIR ?= .build-release
DIST_DIR   ?= dist
# Debian packages the build, the tests, the demo and the benchmarks need; lintian, systemd
# (systemd-analyze) and dpkg-dev (dpkg-shlibdeps) check and build the .deb; runc and
# busybox-static run the container tests; strace attaches to the broker in a containment test.
APT_PACKAGES := socat bc gcc libc6-dev pkg-config libseccomp-dev python3 runc busybox-static lintian systemd dpkg-dev strace
# The Swift runtime and Foundation linked in statically (the guest needs no Swift), no $ORIGIN
# rpath, and BIND_NOW for a fully read-only relocation table.
DEB_SWIFT_FLAGS := -c release --static-swift-stdlib --disable-local-rpath -Xlinker -z -Xlinker now

.PHONY: all deps build release test test-skips test-core-tsan demo bench deb deb-check deb-install-check fuzz fuzz-build fuzz-smoke soak soak-smoke clean

all: build

# Installs the missing Debian packages (needs root; says exactly what is missing otherwise).
deps:
	@command -v $(SWIFT) >/dev/null || { echo "error: '$(SWIFT)' not found: install a Swift 6.2+ toolchain (https://swift.org/install/linux)"; exit 1; }
	@missing=""; for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "error: missing Debian packages:$$missing (run make as root, or: sudo apt-get install$$missing)"; exit 1; fi; \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

build: deps
	$(SWIFT) build --scratch-path $(BUILD_DIR)

release: deps
	$(SWIFT) build -c release --scratch-path $(BUILD_DIR)

# At most this many tests run at once. Unbounded, all ~350 start together, and on a 2-core
# machine a test's time bounds (a 5 s handshake, a 30 s wait) then measure the other tests'
# load rather than what it checks; 8 keeps the wall time (most tests wait on processes and
# timers) and ends those flakes.
TEST_WIDTH ?= --experimental-maximum-parallelization-width 8

# Every test, the core's tests again under ThreadSanitizer, 10 s of each fuzz target, a
# 2-minute soak, then the package built and checked (the static release build adds about 4
# minutes on 2 cores from a fresh clone).
test: deps
	$(SWIFT) build --build-tests --scratch-path $(BUILD_DIR)
	set -o pipefail; $(SWIFT) test --skip-build --scratch-path $(BUILD_DIR) $(TEST_WIDTH) 2>&1 | tee $(BUILD_DIR)/test.log
	$(MAKE) test-core-tsan
	$(MAKE) fuzz-smoke
	$(MAKE) soak-smoke
	$(MAKE) deb-check
	@$(MAKE) --no-print-directory test-skips

# How many tests skipped themselves (a missing root, runc or python says so through a trait),
# and which: as root with `make test`'s packages installed, none — so there a skip fails the
# step (a test that stopped running as root would otherwise pass unnoticed); as another user
# the skips are listed only.
test-skips:
	@skipped=$$(sed 's/\x1b\[[0-9;]*m//g' $(BUILD_DIR)/test.log | grep -E '^. Test .* skipped' || true); \
	count=$$(printf '%s' "$$skipped" | grep -c . || true); \
	echo "skipped tests: $$count"; \
	if [ "$$count" != 0 ]; then printf '%s\n' "$$skipped" | sed 's/^/  /'; fi; \
	if [ "$$count" != 0 ] && [ "$$(id -u)" = 0 ]; then \
		echo "error: $$count test(s) skipped as root: every test runs as root once make test's packages are installed (see the reasons above)"; \
		exit 1; \
	fi

# A report fails the step; every report is printed whole at the end (a CI log keeps the tail).
test-core-tsan: deps
	@mkdir -p $(TSAN_DIR) && rm -f $(TSAN_DIR)/tsan-report.*
	TSAN_OPTIONS="log_path=$(CURDIR)/$(TSAN_DIR)/tsan-report" $(SWIFT) test --sanitize=thread --scratch-path $(TSAN_DIR) --filter HoldfastCoreTests $(TEST_WIDTH); \
	status=$$?; if ls $(TSAN_DIR)/tsan-report.* >/dev/null 2>&1; then cat $(TSAN_DIR)/tsan-report.*; exit 1; fi; exit $$status

# libFuzzer on the bridge frames, the broker's control messages, the stream frames and hello,
# and the configuration loader (README "Fuzzing"). Crashes land in $(FUZZ_DIR)/artifacts/.
fuzz-build: deps
	$(SWIFT) build --product holdfast-fuzz --scratch-path $(FUZZ_DIR) $(FUZZ_FLAGS)

fuzz: fuzz-build
	fuzz/run.sh $(FUZZ_DIR)/debug/holdfast-fuzz $(FUZZ_SECONDS) $(FUZZ_DIR) $(FUZZ_TARGETS)

fuzz-smoke:
	$(MAKE) fuzz FUZZ_SECONDS=10

demo: build
	$(BUILD_DIR)/debug/holdfast demo

# CPU per GiB and throughput against a splice(2) loop, a C read/write loop and socat, raw and
# resumable, and the receiving side against a C sink (with the ratio lines of issue 19's
# targets); syscalls per GiB (with perf); the cost of 3,000 idle resumable streams; reconnect
# latency; the broker at scale (its CPU per GiB against the single-stream resumable figure).
# BENCH_BASELINE=path/to/an/older/holdfast adds its rows to the first part (before/after).
# See BENCHMARKS.md.
bench: release
	bench/run.sh $(BUILD_DIR)/release/holdfast bench/out/single-stream.txt
	bench/syscalls.sh $(BUILD_DIR)/release/holdfast
	$(BUILD_DIR)/release/holdfast-bench idle-streams --count 3000 --seconds 10
	$(BUILD_DIR)/release/holdfast-bench reconnect --streams 1 --rounds 50
	$(BUILD_DIR)/release/holdfast-bench reconnect --streams 2000 --rounds 5 --every 200
	$(BUILD_DIR)/release/holdfast-bench scale --processes 1000 --busy 100 --bytes 33554432 \
		--reference-cpu-per-gib $$(sed -n 's/^resumable_relay_cpu_per_gib=//p' bench/out/single-stream.txt)

# The Debian package: static release build, then packaging/build-deb.sh (dpkg-deb); prints the
# .deb's path.
deb: deps
	$(SWIFT) build $(DEB_SWIFT_FLAGS) --product holdfast --scratch-path $(DEB_BUILD_DIR)
	@packaging/build-deb.sh $(DEB_BUILD_DIR)/release/holdfast $(DIST_DIR)

# lintian (no errors or warnings), systemd-analyze verify, the unpacked binary (--version, ldd,
# config check, the manual page) and a smoke test of the unpacked daemon, a live upgrade onto a
# newer build while a process streams included: packaging/check-deb.sh.
deb-check: deb
	packaging/check-deb.sh $(DIST_DIR)/holdfast_$$(sed -n '1s/^holdfast (\([^)]*\)) .*/\1/p' packaging/debian/changelog)_$$(dpkg --print-architecture).deb

# Installs, reinstalls, upgrades to a newer package under a running daemon while a process
# streams (the postinst must upgrade it live), removes and purges the .deb on THIS machine,
# checking what the maintainer scripts did (creates and deletes the user 'holdfast'): for
# throwaway machines, not in `test`.
deb-install-check: deb
	packaging/install-check.sh $(DIST_DIR)/holdfast_$$(sed -n '1s/^holdfast (\([^)]*\)) .*/\1/p' packaging/debian/changelog)_$$(dpkg --print-architecture).deb

# A real daemon for SOAK_MINUTES (after a warm-up: 30 s, or a sixth of a longer soak, at most
# 5 min) under ~100 churning processes, a migration every 2 s and SIGKILLs of the bridge worker;
# checks every byte (sha256), every exit (exactly once), the roles' fds and RSS, the broker's and
# the supervisor's malloc against the warm-up baseline, and no live broker object when quiet.
# As root. See RELIABILITY.md.
soak: release
	$(BUILD_DIR)/release/holdfast-soak --minutes $(SOAK_MINUTES)

# A short soak from the debug build, for SOAK_MINUTES (2), as `make test` runs it.
soak-smoke: build
	@if [ "$$(id -u)" != 0 ]; then echo "skip: the soak needs root (its broker runs as a uid of its own)"; \
	else $(BUILD_DIR)/debug/holdfast-soak --minutes $(SOAK_MINUTES) --fallback-every 2; fi

clean:
	rm -rf $(BUILD_DIR) $(TSAN_DIR) $(DEB_BUILD_DIR) $(DIST_DIR) $(FUZZ_DIR) bench/bin
