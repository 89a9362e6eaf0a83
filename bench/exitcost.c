/*
** exitcost.c - the run loop's cost per exit, without KVM, for `make bench`
** (rows 1c-1e, bench/exitcost.lua) and issue 13.
**
**   exitcost SCENARIO N   SCENARIO: cdev | lua | unclaimed
**
** Linked with the whole core (every csrc .c file, built with kvm/core.so's flags). A
** VM and a vCPU are made with the core's own constructors (kvm_vm_push,
** kvm_vcpu_push), not from /dev/kvm: the VM's fd and the vCPU's are
** /dev/null (open, so the methods that check for a closed VM work; the
** ioctls made outside the loop fail harmlessly) and the kvm_run page is
** anonymous memory. The vCPU's KVM_RUN (Vcpu.enter) is fake_kvm_run, which
** writes a port-I/O exit as KVM would (out, one byte, count 1, port 0x3ff,
** data on the second page) and returns 0. Then, from Lua:
**
**   cdev       vm:serial{output = false}; 0x3ff is its scratch register
**   lua        vm:on_io(0x3ff, function() end)
**   unclaimed  nothing on 0x3ff; run{unclaimed = "ignore"}
**
** and cpu:run{max_exits = N}: the real path, the Lua call included. It
** prints "exits N" after checking that run() returned "max_exits" and that
** the port counter says N. Under callgrind, with collection toggled on in
** l_vcpu_run and off in fake_kvm_run, the instructions counted are those
** from KVM_RUN's return to the next KVM_RUN, plus one run()'s set-up; two N
** cancel the set-up (bench/exitcost.lua).
*/
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "lualib.h"
#include "luakvm.h"

int luaopen_kvm_core(lua_State *L);

#define PORT 0x3ff
#define RUN_SIZE 8192              /* KVM's header page and its PIO page */
#define DATA_OFFSET 4096           /* KVM_PIO_PAGE_OFFSET * page size */

static const char *SCENARIO =
  "local vm, cpu, scenario, n = ...\n"
  "local opts = { max_exits = n }\n"
  "if scenario == 'cdev' then vm:serial{ output = false }\n"
  "elseif scenario == 'lua' then vm:on_io(0x3ff, function() end)\n"
  "elseif scenario == 'unclaimed' then opts.unclaimed = 'ignore'\n"
  "else error('unknown scenario ' .. scenario .. ' (cdev, lua or unclaimed)', 0) end\n"
  "local e = cpu:run(opts)\n"
  "assert(e.reason == 'max_exits', 'run() returned ' .. tostring(e))\n"
  "local hits = vm:stats().ports[0x3ff]\n"
  "assert(hits == n, ('port 0x3ff counted %s exits, not %d'):format(hits, n))\n"
  "cpu:close()\n"
  "vm:close()\n";

/* KVM_RUN, faked: the guest wrote a byte to PORT */
__attribute__((noinline)) int fake_kvm_run(Vcpu *c) {
  struct kvm_run *run = c->run;
  run->exit_reason = KVM_EXIT_IO;
  run->io.direction = KVM_EXIT_IO_OUT;
  run->io.size = 1;
  run->io.port = PORT;
  run->io.count = 1;
  run->io.data_offset = DATA_OFFSET;
  ((uint8_t *)run)[DATA_OFFSET] = 0x5a;
  return 0;
}

static int die(const char *what) {
  perror(what);
  return 1;
}

/* the VM and its vCPU 0, on the stack */
static int push_machine(lua_State *L) {
  Vm *vm = kvm_vm_push(L);
  vm->fd = open("/dev/null", O_RDWR | O_CLOEXEC);
  int cfd = open("/dev/null", O_RDWR | O_CLOEXEC);
  if (vm->fd < 0 || cfd < 0) return die("open /dev/null");
  vm->run_size = RUN_SIZE;
  void *run = mmap(NULL, RUN_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (run == MAP_FAILED) return die("mmap");
  Vcpu *c = kvm_vcpu_push(L, -1, 0, cfd, run, RUN_SIZE);
  c->enter = fake_kvm_run;
  return 0;
}

int main(int argc, char **argv) {
  long n = argc == 3 ? strtol(argv[2], NULL, 10) : 0;
  if (n <= 0) {
    fprintf(stderr, "usage: exitcost cdev|lua|unclaimed N\n");
    return 2;
  }
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "kvm.core", luaopen_kvm_core, 0);   /* package.loaded["kvm.core"] */
  lua_pop(L, 1);
  if (luaL_loadstring(L, SCENARIO) != LUA_OK) goto lua_err;
  if (push_machine(L)) return 1;
  lua_pushstring(L, argv[1]);
  lua_pushinteger(L, n);
  if (lua_pcall(L, 4, 0, 0) != LUA_OK) goto lua_err;
  printf("exits %ld\n", n);
  lua_close(L);
  return 0;
lua_err:
  fprintf(stderr, "exitcost: %s\n", lua_tostring(L, -1));
  return 1;
}
