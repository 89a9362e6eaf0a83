# luakvm - build kvm/core.so in the tree, the test guests, and run things.
LUA      ?= lua5.4
LUA_INC  ?= $(shell pkg-config --cflags lua5.4 2>/dev/null || echo -I/usr/include/lua5.4)
CC       ?= gcc
CFLAGS   ?= -O2 -g
WARN      = -std=gnu11 -Wall -Wextra -Wpedantic -Wshadow -Wno-unused-parameter
ALLFLAGS  = $(WARN) $(CFLAGS) -fPIC -fvisibility=hidden $(LUA_INC)
LIBS      = -lelf
SRCS      = $(wildcard csrc/*.c)
HDRS      = $(wildcard csrc/*.h)
GUESTS_S  = $(wildcard examples/guests/*.S spec/guest/*.S)
GUESTS    = $(GUESTS_S:.S=.bin)
BUSTED   ?= busted

.DEFAULT_GOAL := all
ASAN_FLAGS = -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
TSAN_FLAGS = -O1 -g -fsanitize=thread -fno-omit-frame-pointer
# a lua5.4 of the sanitizers' own (spec/lua_asan.c, Lua linked in statically)
SAN_LUA = spec/lua_asan.c -Wl,-E \
  $$(pkg-config --variable=libdir lua5.4 2>/dev/null || echo /usr/lib/x86_64-linux-gnu)/liblua5.4.a -lm -ldl
# the specs where several threads touch the core: vm:run's, the devices', the run loop's
THREAD_SPECS = spec/guest/smp_spec.lua spec/guest/serial_spec.lua spec/guest/devices_spec.lua \
               spec/guest/run_spec.lua spec/guest/hostile_spec.lua spec/guest/virtio_lua_spec.lua
.PHONY: all test e2e check-memory check-threads bench kernel clean caps deps run doc lint rock

# Debian 12 packages the build, the tests and the default kernel need
DEB_PKGS = lua5.4 liblua5.4-dev libelf-dev lua-busted luarocks binutils gcc make tmux \
           pkg-config lz4 cpio busybox-static gzip zip unzip qemu-system-x86 acpica-tools \
           lua-check cppcheck clang-tidy clang libclang-rt-14-dev \
           valgrind strace lua-ldoc e2fsprogs gdb
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

deps:
	@if dpkg -s $(DEB_PKGS) >/dev/null 2>&1; then echo "deps: all installed"; else \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEB_PKGS); fi

# the main job: boot the default kernel (make kernel) on this terminal
# (on this machine's KVM, or nested under QEMU where there is none: tools/nested.sh)
run: all kernel
	@sh tools/nested.sh auto --userspace -i -t 86400 -- \
	  $(LUA) examples/boot_linux.lua guest-kernel/vmlinux --initrd guest-kernel/initramfs.cpio.gz


all: kvm/core.so $(GUESTS)

kvm/core.so: $(SRCS) $(HDRS)
	@mkdir -p kvm
	$(CC) $(ALLFLAGS) -shared -o $@ $(SRCS) $(LIBS)

# flat binary guests: assemble, link at 0, strip to raw bytes
%.bin: %.S
	$(CC) -c -o $*.o $<
	ld -Ttext=0 --oformat=binary -o $@ $*.o
	@rm -f $*.o

# every spec on a real KVM: this machine's, or nested under QEMU (tools/test.sh)
test: all kernel
	sh tools/test.sh

# the whole suite once more with ASan + UBSan in the core, leaks included
# (but the Linux boots and the rock install: minutes each, nothing new to see),
# on a real KVM like make test
check-memory:
	$(MAKE) clean
	$(MAKE) all CFLAGS="$(ASAN_FLAGS)"
	$(CC) $(ASAN_FLAGS) $(LUA_INC) -o spec/lua-asan $(SAN_LUA)
	@mkdir -p spec/asan-bin && ln -sf ../lua-asan spec/asan-bin/lua5.4
	PATH="$(CURDIR)/spec/asan-bin:$$PATH" \
	  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=23 \
	  LSAN_OPTIONS=suppressions=$(CURDIR)/spec/lsan.supp:print_suppressions=0 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  sh tools/test.sh --exclude-tags=e2e,rock; \
	  st=$$?; $(MAKE) clean; $(MAKE) all; exit $$st

# the specs with threads once more with ThreadSanitizer in the core and in a
# lua5.4 of its own (as check-memory's), on a real KVM like make test: a data
# race or a lock-order inversion fails them
check-threads:
	$(MAKE) clean
	$(MAKE) all CFLAGS="$(TSAN_FLAGS)"
	$(CC) $(TSAN_FLAGS) $(LUA_INC) -o spec/lua-tsan $(SAN_LUA)
	@mkdir -p spec/tsan-bin && ln -sf ../lua-tsan spec/tsan-bin/lua5.4
	PATH="$(CURDIR)/spec/tsan-bin:$$PATH" \
	  TSAN_OPTIONS=halt_on_error=1:exitcode=66:report_signal_unsafe=0:second_deadlock_stack=1 \
	  sh tools/test.sh --exclude-tags=e2e,rock,userspace $(THREAD_SPECS); \
	  st=$$?; $(MAKE) clean; $(MAKE) all; exit $$st

bench: all
	$(MAKE) -C bench

# the exit-cost harness of make bench (bench/exitcost.c): the core's sources
# and flags in an executable that makes no KVM call (bench/Makefile builds it)
LUA_LIBS ?= $(shell pkg-config --libs lua5.4 2>/dev/null || echo -llua5.4)
bench/exitcost: bench/exitcost.c $(SRCS) $(HDRS)
	$(CC) $(ALLFLAGS) -Icsrc -o $@ $< $(SRCS) $(LIBS) $(LUA_LIBS)

kernel:
	sh examples/fetch_kernel.sh guest-kernel

# the source rock: luakvm-scm-1.src.rock, a zip of the rockspec and a
# `git archive` of the checkout (luakvm-scm-1.tar.gz, top folder luakvm/, the
# file the rockspec's source.url names: what `luarocks pack` makes), so that
#   luarocks --lua-version=5.4 install ./luakvm-scm-1.src.rock
# builds and installs it offline. Tracked files as they are in the work tree
# (committed or not: `git stash create`); untracked files are left out.
ROCK = luakvm-scm-1
rock:
	@command -v zip >/dev/null || { echo "make rock: needs zip (apt-get install zip)"; exit 1; }
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	  tree=$$(git stash create); \
	  git archive --format=tar.gz --prefix=luakvm/ -o "$$tmp/$(ROCK).tar.gz" $${tree:-HEAD}; \
	  rm -f $(ROCK).src.rock; \
	  zip -q -j $(ROCK).src.rock $(ROCK).rockspec "$$tmp/$(ROCK).tar.gz"; \
	  echo "make rock: $(ROCK).src.rock ($(ROCK).rockspec, $(ROCK).tar.gz)"

caps:
	{ echo "/* generated by 'make caps' from <linux/kvm.h>: KVM_CAP_* names */"; \
	  grep -oE '#define KVM_CAP_[A-Z0-9_]+[[:space:]]+[0-9]+' /usr/include/linux/kvm.h | \
	  awk '{n=$$2; s=substr(n,9); printf "#ifdef %s\n  {\"%s\", %s},\n#endif\n", n, s, n}'; } > csrc/caps.h

# API reference from the LDoc comments (Lua and the C core's /*** comments)
# into doc/ (git-ignored). Needs Debian's lua-ldoc; markdown in the comments
# is rendered when lua-markdown is installed too.
doc:
	@command -v ldoc >/dev/null || { echo "make doc: needs ldoc (apt-get install lua-ldoc)"; exit 1; }
	@for f in $(SRCS); do grep -q "\"$$f\"" config.ld || { echo "config.ld: add $$f to 'file'"; exit 1; }; done
	ldoc --fatalwarnings $$(lua5.1 -e 'require "markdown"' 2>/dev/null && echo "-f markdown") .

# static checks: luacheck (.luacheckrc), the C core with -Werror, cppcheck,
# and clang-tidy (.clang-tidy) when it is installed.
# cppcheck: --max-configs=1 checks the build's configuration (caps.h has one
# #ifdef per KVM_CAP_ name; toomanyconfigs only says so).
lint:
	luacheck -q --no-color lua spec examples bench
	$(CC) $(WARN) -Werror $(CFLAGS) $(LUA_INC) -fsyntax-only $(SRCS)
	cppcheck -q --enable=warning,performance,portability --error-exitcode=1 --inline-suppr \
	  --suppress=missingIncludeSystem --suppress=toomanyconfigs --max-configs=1 \
	  -I csrc $(LUA_INC:-I%=-I %) $(SRCS)
	@# one file per clang-tidy run: clang-tidy 14 run over several files at
	@# once reports a va_list in elf.c as uninitialized (it is not; alone, it is clean)
	@if command -v clang-tidy >/dev/null; then \
	  for f in $(SRCS); do echo "clang-tidy $$f"; \
	    out=$$(clang-tidy --quiet $$f -- -std=gnu11 $(LUA_INC) -Icsrc 2>&1); st=$$?; \
	    printf '%s\n' "$$out" | grep -v "warnings generated" || true; [ $$st = 0 ] || exit 1; done; \
	else echo "lint: clang-tidy not installed, skipped"; fi

clean:
	rm -f kvm/core.so $(GUESTS) bench/exitcost

# libFuzzer harnesses (spec/fuzz/README.md): build with clang, then run each
# for FUZZ_SECONDS on its seed corpus; `make fuzz FUZZ_SECONDS=10` for CI
.PHONY: fuzz fuzz-build fuzz-run
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 30
FUZZ_DIR      = spec/fuzz/build
FUZZ_FLAGS    = -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined \
                -fno-sanitize-recover=undefined $(LUA_INC) -DLUAKVM_ROOT='"$(CURDIR)"'
FUZZ_LIBS     = -llua5.4 -lelf
FUZZERS       = elf bzimage exit virtio devsnap snapshot

fuzz-build: $(FUZZ_DIR)/fuzz_elf $(FUZZ_DIR)/fuzz_bzimage $(FUZZ_DIR)/fuzz_exit $(FUZZ_DIR)/fuzz_virtio \
            $(FUZZ_DIR)/fuzz_devsnap $(FUZZ_DIR)/fuzz_snapshot

# each harness is linked with the whole core and uses its private header
$(FUZZ_DIR)/fuzz_elf $(FUZZ_DIR)/fuzz_bzimage $(FUZZ_DIR)/fuzz_exit $(FUZZ_DIR)/fuzz_virtio $(FUZZ_DIR)/fuzz_devsnap \
  $(FUZZ_DIR)/fuzz_snapshot: $(FUZZ_DIR)/%: spec/fuzz/%.c spec/fuzz/fuzz_common.h $(SRCS) $(HDRS)
	@mkdir -p $(FUZZ_DIR)
	$(FUZZ_CC) $(FUZZ_FLAGS) -Icsrc -o $@ $< $(SRCS) $(FUZZ_LIBS)

# built here, run on this machine's KVM or nested under QEMU (tools/nested.sh)
fuzz: fuzz-build
	sh tools/nested.sh auto -t 1800 -- $(MAKE) --no-print-directory fuzz-run FUZZ_SECONDS=$(FUZZ_SECONDS)

fuzz-run:
	@set -e; for f in $(FUZZERS); do \
	  mkdir -p $(FUZZ_DIR)/corpus/$$f; \
	  echo "fuzz_$$f: $(FUZZ_SECONDS) s"; \
	  ASAN_OPTIONS=detect_leaks=1 $(FUZZ_DIR)/fuzz_$$f -max_total_time=$(FUZZ_SECONDS) \
	    -max_len=16384 -rss_limit_mb=4096 -detect_leaks=0 -print_final_stats=1 -artifact_prefix=$(FUZZ_DIR)/ \
	    $(FUZZ_DIR)/corpus/$$f spec/fuzz/corpus/$$f 2>&1 | tee $(FUZZ_DIR)/fuzz_$$f.log | \
	    grep -E 'stat::number_of_executed_units|stat::peak_rss|ERROR|SUMMARY|\*\*\*|Done' || true; \
	  if grep -qE '^==[0-9]+==ERROR|deadly signal|\*\*\* |is not usable here' $(FUZZ_DIR)/fuzz_$$f.log; then \
	    echo "fuzz_$$f: FAILED, see $(FUZZ_DIR)/fuzz_$$f.log"; exit 1; fi; \
	done
