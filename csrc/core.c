/*
** core.c - the kvm.core module: its functions (KVM's version, capabilities,
** CPUID, the host) and luaopen_kvm_core, which opens the classes: vm.c
** (kvm.vm), mem.c (kvm.memory), vcpu.c and run.c (kvm.vcpu), exit.c
** (kvm.exit). The helpers every file shares are util.c.
*/

/***
The C core's module functions (`require "kvm"` gives them too).
@module kvm.core
*/
#define _GNU_SOURCE
#include <cpuid.h>
#include <errno.h>
#include <stdio.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>

#include "luakvm.h"
#include "snapshot.h"

#define LUAKVM_EXPORT __attribute__((visibility("default")))

/* ---------------------------------------------------------------- */

static int open_kvm(void) {
  return open("/dev/kvm", O_RDWR | O_CLOEXEC);
}

/*** Version of the KVM API (12 on every kernel since 2.6.22).
@function api_version
@treturn integer
@return[2] fail, message, errno
*/
static int l_api_version(lua_State *L) {
  int fd = open_kvm();
  if (fd < 0) return kvm_fail(L, "open /dev/kvm");
  int v = ioctl(fd, KVM_GET_API_VERSION, 0);
  int en = errno;
  close(fd);
  if (v < 0) { errno = en; return kvm_fail(L, "KVM_GET_API_VERSION"); }
  lua_pushinteger(L, v);
  return 1;
}

static const struct { const char *name; int cap; } caps[] = {
#include "caps.h"
  {NULL, 0}
};

/* cap as a number, "KVM_CAP_IRQCHIP" or "irqchip" */
int kvm_checkcap(lua_State *L, int arg) {
  if (lua_type(L, arg) == LUA_TNUMBER)
    return (int)kvm_checkrange(L, arg, 0, 0x7fffffff, "capability");
  const char *s = luaL_checkstring(L, arg);
  if (strncasecmp(s, "KVM_CAP_", 8) == 0) s += 8;
  for (int i = 0; caps[i].name; i++)
    if (strcasecmp(caps[i].name, s) == 0) return caps[i].cap;
  return luaL_argerror(L, arg,
      lua_pushfstring(L, "unknown capability '%s'", lua_tostring(L, arg)));
}

/*** Ask KVM about a capability (KVM_CHECK_EXTENSION on /dev/kvm).
@function check_extension
@param cap number, or name: "KVM_CAP_IRQCHIP" or "irqchip"
@treturn integer 0 when absent, else the capability's value
@return[2] fail, message, errno
*/
static int l_check_extension(lua_State *L) {
  int cap = kvm_checkcap(L, 1);
  int fd = open_kvm();
  if (fd < 0) return kvm_fail(L, "open /dev/kvm");
  int v = ioctl(fd, KVM_CHECK_EXTENSION, cap);
  int en = errno;
  close(fd);
  if (v < 0) { errno = en; return kvm_fail(L, "KVM_CHECK_EXTENSION"); }
  lua_pushinteger(L, v);
  return 1;
}

/*** Capability names this build knows, as {name = number}.
@function capabilities
*/
static int l_capabilities(lua_State *L) {
  lua_createtable(L, 0, (int)(sizeof caps / sizeof caps[0]));
  for (int i = 0; caps[i].name; i++) {
    lua_pushinteger(L, caps[i].cap);
    lua_setfield(L, -2, caps[i].name);
  }
  return 1;
}

void kvm_push_cpuid(lua_State *L, const struct kvm_cpuid_entry2 *e, int n) {
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    lua_createtable(L, 0, 7);
    lua_pushinteger(L, e[i].function); lua_setfield(L, -2, "func");
    lua_pushinteger(L, e[i].index); lua_setfield(L, -2, "index");
    lua_pushinteger(L, e[i].flags); lua_setfield(L, -2, "flags");
    lua_pushinteger(L, e[i].eax); lua_setfield(L, -2, "eax");
    lua_pushinteger(L, e[i].ebx); lua_setfield(L, -2, "ebx");
    lua_pushinteger(L, e[i].ecx); lua_setfield(L, -2, "ecx");
    lua_pushinteger(L, e[i].edx); lua_setfield(L, -2, "edx");
    lua_rawseti(L, -2, i + 1);
  }
}

/*** CPUID leaves KVM can give a guest (KVM_GET_SUPPORTED_CPUID).
@function supported_cpuid
@treturn table array of {func=, index=, flags=, eax=, ebx=, ecx=, edx=}
@return[2] fail, message, errno
*/
static int l_supported_cpuid(lua_State *L) {
  int fd = open_kvm();
  if (fd < 0) return kvm_fail(L, "open /dev/kvm");
  for (int n = 128; n <= 4096; n *= 2) {
    size_t sz = sizeof(struct kvm_cpuid2) + (size_t)n * sizeof(struct kvm_cpuid_entry2);
    struct kvm_cpuid2 *c = calloc(1, sz);
    if (c == NULL) { close(fd); return luaL_error(L, "out of memory"); }
    c->nent = (uint32_t)n;
    if (ioctl(fd, KVM_GET_SUPPORTED_CPUID, c) == 0) {
      close(fd);
      /* copy to a Lua-owned buffer first so nothing malloc'd is held
         across calls that can raise */
      size_t bytes = c->nent * sizeof(struct kvm_cpuid_entry2);
      int nent = (int)c->nent;
      struct kvm_cpuid_entry2 *buf = lua_newuserdatauv(L, bytes ? bytes : 1, 0);
      memcpy(buf, c->entries, bytes);
      free(c);
      kvm_push_cpuid(L, buf, nent);
      return 1;
    }
    int en = errno;
    free(c);
    if (en != E2BIG) { close(fd); errno = en; return kvm_fail(L, "KVM_GET_SUPPORTED_CPUID"); }
  }
  close(fd);
  errno = E2BIG;
  return kvm_fail(L, "KVM_GET_SUPPORTED_CPUID");
}

/* is "kvm" registered in /proc/misc (what /dev/kvm's major 10 points to)? */
static int kvm_misc_registered(void) {
  char line[128];
  int found = 0;
  FILE *f = fopen("/proc/misc", "re");
  if (f == NULL) return access("/dev/kvm", F_OK) == 0;
  while (!found && fgets(line, sizeof line, f) != NULL) {
    unsigned minor;
    char name[64];
    if (sscanf(line, "%u %63s", &minor, name) == 2 && strcmp(name, "kvm") == 0) found = 1;
  }
  fclose(f);
  return found;
}

/*** Which KVM serves /dev/kvm here, and does this host itself run under a hypervisor?
`module` is "kvm_intel" or "kvm_amd" when the CPU offers VT-x or AMD-V and
that module is loaded, "kvm_pvm" when /dev/kvm is registered on a CPU with
neither (kvm_pvm, a software KVM; a /sys/module/kvm_pvm folder alone means
nothing: it exists where kvm_pvm refused to bind), "unknown" for any other
registered KVM, nil when no KVM is registered. `pvm`, `amd`, `intel` say the
same as booleans. `hypervisor` is the host CPU's hypervisor signature (CPUID
0x40000000: "KVMKVMKVM", "TCGTCGTCGTCG", "Microsoft Hv", ...), "" when the
hypervisor bit is set without one, nil on bare metal.
@function host_info
@treturn table {module=, pvm=, amd=, intel=, hypervisor=, vmx=, svm=}
*/
static int l_host_info(lua_State *L) {
  unsigned a, b, c, d;
  unsigned vmx = 0, svm = 0, hv = 0;
  char sig[13] = "";
  if (__get_cpuid(1, &a, &b, &c, &d)) { vmx = (c >> 5) & 1; hv = (c >> 31) & 1; }
  if (__get_cpuid(0x80000001, &a, &b, &c, &d)) svm = (c >> 2) & 1;
  if (hv) {
    __cpuid(0x40000000, a, b, c, d);
    memcpy(sig, &b, 4); memcpy(sig + 4, &c, 4); memcpy(sig + 8, &d, 4);
    sig[12] = '\0';
  }
  const char *module = NULL;
  if (kvm_misc_registered()) {
    if (vmx && access("/sys/module/kvm_intel", F_OK) == 0) module = "kvm_intel";
    else if (svm && access("/sys/module/kvm_amd", F_OK) == 0) module = "kvm_amd";
    else if (access("/sys/module/kvm_pvm", F_OK) == 0) module = "kvm_pvm";
    else module = "unknown";
  }
  lua_createtable(L, 0, 7);
  if (module) lua_pushstring(L, module); else lua_pushnil(L);
  lua_setfield(L, -2, "module");
  lua_pushboolean(L, module && strcmp(module, "kvm_pvm") == 0);
  lua_setfield(L, -2, "pvm");
  lua_pushboolean(L, module && strcmp(module, "kvm_intel") == 0);
  lua_setfield(L, -2, "intel");
  lua_pushboolean(L, module && strcmp(module, "kvm_amd") == 0);
  lua_setfield(L, -2, "amd");
  if (hv) lua_pushstring(L, sig); else lua_pushnil(L);
  lua_setfield(L, -2, "hypervisor");
  lua_pushboolean(L, (int)vmx);
  lua_setfield(L, -2, "vmx");
  lua_pushboolean(L, (int)svm);
  lua_setfield(L, -2, "svm");
  return 1;
}

/*** Monotonic clock in seconds (CLOCK_MONOTONIC, system-wide), for timing.
@function now
@treturn number
*/
static int l_now(lua_State *L) {
  lua_pushnumber(L, (lua_Number)kvm_now_ns() / 1e9);
  return 1;
}

static const luaL_Reg funcs[] = {
  {"api_version", l_api_version},
  {"check_extension", l_check_extension},
  {"capabilities", l_capabilities},
  {"supported_cpuid", l_supported_cpuid},
  {"host_info", l_host_info},
  {"now", l_now},
  {"sandbox", l_sandbox},
  {"load_snapshot", l_load_snapshot},
  {NULL, NULL}
};

int l_vm_new(lua_State *L);

LUAKVM_EXPORT int luaopen_kvm_core(lua_State *L) {
  kvm_open_vm(L);
  kvm_open_memory(L);
  kvm_open_vcpu(L);
  kvm_open_exit(L);
  kvm_open_snapshot(L);
  luaL_newlib(L, funcs);
  kvm_open_socket(L);                  /* kvm.tcp_listen, kvm.tcp_connect */
  lua_pushcfunction(L, l_vm_new);
  lua_setfield(L, -2, "vm");
  for (int i = 0; i < 3; i++) {
    static const char *const names[] = {"STOP", "POWEROFF", "RESET"};
    lua_pushlightuserdata(L, &kvm_stop_keys[i]);
    lua_setfield(L, -2, names[i]);
  }
  lua_pushliteral(L, "0.1");
  lua_setfield(L, -2, "_VERSION");
  return 1;
}
