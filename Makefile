# Holdfast — every set-up step lives here. On a fresh Debian machine (as root):
#   make demo   installs what is missing, builds, runs the demo
#   make test   installs what is missing, builds, runs every test
SWIFT      ?= swift
BUILD_DIR  ?= .build
TSAN_DIR   ?= .build-tsan
SOAK_MINUTES ?= 2
# Debian packages the build, the tests, the demo and the benchmarks need.
APT_PACKAGES := socat bc gcc libc6-dev pkg-config libseccomp-dev python3 runc busybox-static

.PHONY: all deps build release test test-core-tsan demo bench soak clean

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

# Every test, then the core's tests again under ThreadSanitizer.
test: deps
	$(SWIFT) build --build-tests --scratch-path $(BUILD_DIR)
	$(SWIFT) test --skip-build --scratch-path $(BUILD_DIR)
	$(MAKE) test-core-tsan

test-core-tsan: deps
	$(SWIFT) test --sanitize=thread --scratch-path $(TSAN_DIR) --filter HoldfastCoreTests

demo: build
	$(BUILD_DIR)/debug/holdfast demo

# Throughput against socat and a C read/write loop, raw against resumable, and the cost of
# 3,000 idle resumable streams; see BENCHMARKS.md.
bench: release
	bench/run.sh $(BUILD_DIR)/release/holdfast
	$(BUILD_DIR)/release/holdfast-bench idle-streams --count 3000 --seconds 10
	$(BUILD_DIR)/release/holdfast-bench reconnect --streams 1 --rounds 50
	$(BUILD_DIR)/release/holdfast-bench reconnect --streams 2000 --rounds 5 --every 200

# A real daemon for SOAK_MINUTES (after a 30 s warm-up) under ~100 churning processes, a
# migration every 2 s and SIGKILLs of the bridge worker; checks every byte (sha256), every exit
# (exactly once), and the roles' fds and RSS against the warm-up baseline. As root. See
# RELIABILITY.md.
soak: release
	$(BUILD_DIR)/release/holdfast-soak --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(BUILD_DIR) $(TSAN_DIR) bench/bin
