/*
** core.c - the kvm.core module: module functions, shared helpers.
**
** Objects live in their own files: vm.c (kvm.vm), mem.c (kvm.memory),
** vcpu.c (kvm.vcpu and the run loop), exit.c (kvm.exit).
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

#define LUAKVM_EXPORT __attribute__((visibility("default")))

uint64_t kvm_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* nil, "WHAT: strerror (hint)", errno -- the io.open convention */
int kvm_fail(lua_State *L, const char *what) {
  int en = errno;
  const char *hint = "";
  if (strcmp(what, "open /dev/kvm") == 0) {
    if (en == ENOENT || en == ENXIO || en == ENODEV)
      hint = " (is the kvm module loaded? try 'modprobe kvm_intel' or 'kvm_amd')";
    else if (en == EACCES || en == EPERM)
      hint = " (add your user to the 'kvm' group, or check /dev/kvm's mode)";
  }
  luaL_pushfail(L);
  lua_pushfstring(L, "%s: %s%s", what, strerror(en), hint);
  lua_pushinteger(L, en);
  return 3;
}

const char *kvm_pushhex(lua_State *L, uint64_t v) {
  char b[24];
  snprintf(b, sizeof b, "0x%llx", (unsigned long long)v);
  return lua_pushstring(L, b);
}

/* an integer in [lo, hi] (unsigned comparison), else an argument error */
uint64_t kvm_checkrange(lua_State *L, int arg, uint64_t lo, uint64_t hi,
                        const char *what) {
  uint64_t v = (uint64_t)luaL_checkinteger(L, arg);
  if (v < lo || v > hi)
    luaL_argerror(L, arg, lua_pushfstring(L, "%s out of range", what));
  return v;
}

uint8_t *kvm_gpa_ptr(Vm *vm, uint64_t gpa, uint64_t len) {
  uint64_t end;
  if (__builtin_add_overflow(gpa, len, &end)) return NULL;
  for (int i = 0; i < KVM_MAX_REGIONS; i++) {
    Memory *m = vm->regions[i];
    if (m == NULL || m->host == NULL) continue;
    if (gpa >= m->guest && end <= m->guest + m->size)
      return m->host + (gpa - m->guest);
  }
  return NULL;
}

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

/* kvm.STOP, kvm.POWEROFF, kvm.RESET: what a handler returns to end run()
   with that reason (kvm_stop_reasons[i + 1]) */
void kvm_opt_table(lua_State *L, int idx) {
  lua_settop(L, idx);
  if (lua_isnil(L, idx)) { lua_newtable(L); lua_replace(L, idx); }
  luaL_checktype(L, idx, LUA_TTABLE);
}

void kvm_new_class(lua_State *L, const char *name, const luaL_Reg *methods,
                   const luaL_Reg *meta) {
  luaL_newmetatable(L, name);
  luaL_setfuncs(L, meta, 0);
  /* with an __index function of its own, the class finds methods under "methods" */
  int has_index = lua_getfield(L, -1, "__index") != LUA_TNIL;
  lua_pop(L, 1);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_setfield(L, -2, has_index ? "methods" : "__index");
  lua_pop(L, 1);
}

int kvm_stop_keys[3];
const char *const kvm_stop_reasons[] = {"none", "stopped", "poweroff", "reset", NULL};

static const luaL_Reg funcs[] = {
  {"api_version", l_api_version},
  {"check_extension", l_check_extension},
  {"capabilities", l_capabilities},
  {"supported_cpuid", l_supported_cpuid},
  {"host_info", l_host_info},
  {"now", l_now},
  {"sandbox", l_sandbox},
  {NULL, NULL}
};

int l_vm_new(lua_State *L);

LUAKVM_EXPORT int luaopen_kvm_core(lua_State *L) {
  kvm_open_vm(L);
  kvm_open_memory(L);
  kvm_open_vcpu(L);
  kvm_open_exit(L);
  luaL_newlib(L, funcs);
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
