/*
** fuzz_common.h - what the libFuzzer harnesses share: one Lua state with
** kvm.core preloaded (the C sources are compiled into the harness), the
** repository's Lua modules on package.path, and a memfd the fuzz input is
** written to, so that code taking a path (vm:load_elf, linux.probe) reads
** exactly the fuzzer's bytes.
**
** A harness aborts (libFuzzer reports a crash and keeps the input) when a
** contract is broken: a bad file must give nil + message, never raise.
*/
#ifndef FUZZ_COMMON_H
#define FUZZ_COMMON_H

#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "lua.h"
#include "lauxlib.h"
#include "lualib.h"

#ifndef LUAKVM_ROOT
#define LUAKVM_ROOT "."
#endif

int luaopen_kvm_core(lua_State *L);

/* print the message on top and abort: libFuzzer saves the input */
static void fuzz_die(lua_State *L, const char *what) {
  fprintf(stderr, "\n*** %s: %s\n", what, lua_tostring(L, -1) ? lua_tostring(L, -1) : "?");
  abort();
}

/* a fresh state with kvm.core preloaded and the repo's lua/ on the path */
static lua_State *fuzz_lua(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_kvm_core);
  lua_setfield(L, -2, "kvm.core");
  lua_pop(L, 1);
  if (luaL_dostring(L, "package.path = '" LUAKVM_ROOT "/lua/?.lua;" LUAKVM_ROOT
                       "/lua/?/init.lua;' .. package.path"))
    fuzz_die(L, "package.path");
  return L;
}

/* load chunk src (which returns a function) and leave that function in the
   registry under key; the harness calls it for every input */
static void fuzz_chunk(lua_State *L, const char *key, const char *src) {
  if (luaL_loadstring(L, src) != LUA_OK || lua_pcall(L, 0, 1, 0) != LUA_OK)
    fuzz_die(L, key);
  lua_setfield(L, LUA_REGISTRYINDEX, key);
}

static int fuzz_fd = -1;
static char fuzz_path[64];

/* the input as a file: /proc/self/fd/N of a memfd holding exactly data */
static const char *fuzz_file(const uint8_t *data, size_t size) {
  if (fuzz_fd < 0) {
    fuzz_fd = memfd_create("fuzz-input", MFD_CLOEXEC);
    if (fuzz_fd < 0) { perror("memfd_create"); abort(); }
    snprintf(fuzz_path, sizeof fuzz_path, "/proc/self/fd/%d", fuzz_fd);
  }
  if (ftruncate(fuzz_fd, 0) != 0) { perror("ftruncate"); abort(); }
  size_t done = 0;
  while (done < size) {
    ssize_t n = pwrite(fuzz_fd, data + done, size - done, (off_t)done);
    if (n <= 0) { perror("pwrite"); abort(); }
    done += (size_t)n;
  }
  return fuzz_path;
}

/* is /dev/kvm usable? The harnesses need a real VM: without one they fail
   (make fuzz runs them nested under QEMU where the host has none) */
static int fuzz_kvm_ok(void) {
  if (access("/dev/kvm", R_OK | W_OK) != 0) {
    fprintf(stderr, "fuzz: /dev/kvm is not usable here (make fuzz runs nested where it is missing)\n");
    return 0;
  }
  return 1;
}

#endif
