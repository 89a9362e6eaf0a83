/*
** sandbox.c - kvm.sandbox{allow = {...}, action = "eperm"|"kill"}: an
** opt-in seccomp-bpf filter for a VMM that has finished setting up.
**
** After the call the process (every thread, where the kernel can sync them)
** may only make the system calls the run loop, the built-in devices and
** ordinary Lua code need -- ioctl (KVM_RUN, the device ioctls, tcgetattr/
** tcsetattr), read/write, poll, clocks, signals and the run loop's timer,
** memory management for Lua's allocator, futex, exit -- plus the names in
** `allow`. Anything else fails with EPERM (action "eperm", the default) or
** kills the process (action "kill"). open/openat are not in the default
** set: create VMs, load files and open the serial input first. A filter
** cannot be removed; a second call adds another filter, which can only
** narrow what is allowed (seccomp itself is allowed for that reason: any
** filter it installs can only take more away).
**
** The filter checks the architecture first (AUDIT_ARCH_X86_64) and refuses
** x32 system calls (numbers with bit 30 set), so a syscall number always
** means what the table below says.
*/

/*** kvm.sandbox, below, is a function of kvm.core.
@module kvm.core
*/
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stddef.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

#include "luakvm.h"

#ifndef SECCOMP_RET_KILL_PROCESS
#define SECCOMP_RET_KILL_PROCESS 0x80000000U
#endif
#ifndef SECCOMP_SET_MODE_FILTER
#define SECCOMP_SET_MODE_FILTER 1
#endif
#ifndef SECCOMP_FILTER_FLAG_TSYNC
#define SECCOMP_FILTER_FLAG_TSYNC 1
#endif

#if defined(__x86_64__)
#define SANDBOX_ARCH AUDIT_ARCH_X86_64
#define X32_SYSCALL_BIT 0x40000000U
#endif

typedef struct Sysname { const char *name; int nr; } Sysname;

#define S(n) { #n, __NR_##n }

/* every x86-64 system call this build's <asm/unistd_64.h> names */
static const Sysname sysnames[] = {
  S(read), S(write), S(open), S(close), S(stat), S(fstat), S(lstat), S(poll), S(lseek), S(mmap),
  S(mprotect), S(munmap), S(brk), S(rt_sigaction), S(rt_sigprocmask), S(rt_sigreturn), S(ioctl),
  S(pread64), S(pwrite64), S(readv), S(writev), S(access), S(pipe), S(select), S(sched_yield),
  S(mremap), S(msync), S(mincore), S(madvise), S(shmget), S(shmat), S(shmctl), S(dup), S(dup2),
  S(pause), S(nanosleep), S(getitimer), S(alarm), S(setitimer), S(getpid), S(sendfile), S(socket),
  S(connect), S(accept), S(sendto), S(recvfrom), S(sendmsg), S(recvmsg), S(shutdown), S(bind),
  S(listen), S(getsockname), S(getpeername), S(socketpair), S(setsockopt), S(getsockopt), S(clone),
  S(fork), S(vfork), S(execve), S(exit), S(wait4), S(kill), S(uname), S(semget), S(semop),
  S(semctl), S(shmdt), S(msgget), S(msgsnd), S(msgrcv), S(msgctl), S(fcntl), S(flock), S(fsync),
  S(fdatasync), S(truncate), S(ftruncate), S(getdents), S(getcwd), S(chdir), S(fchdir), S(rename),
  S(mkdir), S(rmdir), S(creat), S(link), S(unlink), S(symlink), S(readlink), S(chmod), S(fchmod),
  S(chown), S(fchown), S(lchown), S(umask), S(gettimeofday), S(getrlimit), S(getrusage),
  S(sysinfo), S(times), S(ptrace), S(getuid), S(syslog), S(getgid), S(setuid), S(setgid),
  S(geteuid), S(getegid), S(setpgid), S(getppid), S(getpgrp), S(setsid), S(setreuid), S(setregid),
  S(getgroups), S(setgroups), S(setresuid), S(getresuid), S(setresgid), S(getresgid), S(getpgid),
  S(setfsuid), S(setfsgid), S(getsid), S(capget), S(capset), S(rt_sigpending), S(rt_sigtimedwait),
  S(rt_sigqueueinfo), S(rt_sigsuspend), S(sigaltstack), S(utime), S(mknod), S(uselib),
  S(personality), S(ustat), S(statfs), S(fstatfs), S(sysfs), S(getpriority), S(setpriority),
  S(sched_setparam), S(sched_getparam), S(sched_setscheduler), S(sched_getscheduler),
  S(sched_get_priority_max), S(sched_get_priority_min), S(sched_rr_get_interval), S(mlock),
  S(munlock), S(mlockall), S(munlockall), S(vhangup), S(modify_ldt), S(pivot_root), S(_sysctl),
  S(prctl), S(arch_prctl), S(adjtimex), S(setrlimit), S(chroot), S(sync), S(acct), S(settimeofday),
  S(mount), S(umount2), S(swapon), S(swapoff), S(reboot), S(sethostname), S(setdomainname),
  S(iopl), S(ioperm), S(create_module), S(init_module), S(delete_module), S(get_kernel_syms),
  S(query_module), S(quotactl), S(nfsservctl), S(getpmsg), S(putpmsg), S(afs_syscall), S(tuxcall),
  S(security), S(gettid), S(readahead), S(setxattr), S(lsetxattr), S(fsetxattr), S(getxattr),
  S(lgetxattr), S(fgetxattr), S(listxattr), S(llistxattr), S(flistxattr), S(removexattr),
  S(lremovexattr), S(fremovexattr), S(tkill), S(time), S(futex), S(sched_setaffinity),
  S(sched_getaffinity), S(set_thread_area), S(io_setup), S(io_destroy), S(io_getevents),
  S(io_submit), S(io_cancel), S(get_thread_area), S(lookup_dcookie), S(epoll_create),
  S(epoll_ctl_old), S(epoll_wait_old), S(remap_file_pages), S(getdents64), S(set_tid_address),
  S(restart_syscall), S(semtimedop), S(fadvise64), S(timer_create), S(timer_settime),
  S(timer_gettime), S(timer_getoverrun), S(timer_delete), S(clock_settime), S(clock_gettime),
  S(clock_getres), S(clock_nanosleep), S(exit_group), S(epoll_wait), S(epoll_ctl), S(tgkill),
  S(utimes), S(vserver), S(mbind), S(set_mempolicy), S(get_mempolicy), S(mq_open), S(mq_unlink),
  S(mq_timedsend), S(mq_timedreceive), S(mq_notify), S(mq_getsetattr), S(kexec_load), S(waitid),
  S(add_key), S(request_key), S(keyctl), S(ioprio_set), S(ioprio_get), S(inotify_init),
  S(inotify_add_watch), S(inotify_rm_watch), S(migrate_pages), S(openat), S(mkdirat), S(mknodat),
  S(fchownat), S(futimesat), S(newfstatat), S(unlinkat), S(renameat), S(linkat), S(symlinkat),
  S(readlinkat), S(fchmodat), S(faccessat), S(pselect6), S(ppoll), S(unshare), S(set_robust_list),
  S(get_robust_list), S(splice), S(tee), S(sync_file_range), S(vmsplice), S(move_pages),
  S(utimensat), S(epoll_pwait), S(signalfd), S(timerfd_create), S(eventfd), S(fallocate),
  S(timerfd_settime), S(timerfd_gettime), S(accept4), S(signalfd4), S(eventfd2), S(epoll_create1),
  S(dup3), S(pipe2), S(inotify_init1), S(preadv), S(pwritev), S(rt_tgsigqueueinfo),
  S(perf_event_open), S(recvmmsg), S(fanotify_init), S(fanotify_mark), S(prlimit64),
  S(name_to_handle_at), S(open_by_handle_at), S(clock_adjtime), S(syncfs), S(sendmmsg), S(setns),
  S(getcpu), S(process_vm_readv), S(process_vm_writev), S(kcmp), S(finit_module), S(sched_setattr),
  S(sched_getattr), S(renameat2), S(seccomp), S(getrandom), S(memfd_create), S(kexec_file_load),
  S(bpf), S(execveat), S(userfaultfd), S(membarrier), S(mlock2), S(copy_file_range), S(preadv2),
  S(pwritev2), S(pkey_mprotect), S(pkey_alloc), S(pkey_free),
#ifdef __NR_statx
  S(statx),
#endif
#ifdef __NR_io_pgetevents
  S(io_pgetevents),
#endif
#ifdef __NR_rseq
  S(rseq),
#endif
#ifdef __NR_pidfd_send_signal
  S(pidfd_send_signal),
#endif
#ifdef __NR_io_uring_setup
  S(io_uring_setup),
#endif
#ifdef __NR_io_uring_enter
  S(io_uring_enter),
#endif
#ifdef __NR_io_uring_register
  S(io_uring_register),
#endif
#ifdef __NR_open_tree
  S(open_tree),
#endif
#ifdef __NR_move_mount
  S(move_mount),
#endif
#ifdef __NR_fsopen
  S(fsopen),
#endif
#ifdef __NR_fsconfig
  S(fsconfig),
#endif
#ifdef __NR_fsmount
  S(fsmount),
#endif
#ifdef __NR_fspick
  S(fspick),
#endif
#ifdef __NR_pidfd_open
  S(pidfd_open),
#endif
#ifdef __NR_clone3
  S(clone3),
#endif
#ifdef __NR_close_range
  S(close_range),
#endif
#ifdef __NR_openat2
  S(openat2),
#endif
#ifdef __NR_pidfd_getfd
  S(pidfd_getfd),
#endif
#ifdef __NR_faccessat2
  S(faccessat2),
#endif
#ifdef __NR_process_madvise
  S(process_madvise),
#endif
#ifdef __NR_epoll_pwait2
  S(epoll_pwait2),
#endif
#ifdef __NR_mount_setattr
  S(mount_setattr),
#endif
#ifdef __NR_quotactl_fd
  S(quotactl_fd),
#endif
#ifdef __NR_landlock_create_ruleset
  S(landlock_create_ruleset),
#endif
#ifdef __NR_landlock_add_rule
  S(landlock_add_rule),
#endif
#ifdef __NR_landlock_restrict_self
  S(landlock_restrict_self),
#endif
#ifdef __NR_memfd_secret
  S(memfd_secret),
#endif
#ifdef __NR_process_mrelease
  S(process_mrelease),
#endif
#ifdef __NR_futex_waitv
  S(futex_waitv),
#endif
#ifdef __NR_set_mempolicy_home_node
  S(set_mempolicy_home_node),
#endif

  { NULL, 0 }
};

/* what the run loop, the devices, Lua and glibc's malloc and stdio need */
static const char *const base_allow[] = {
  /* KVM, terminals (tcgetattr/tcsetattr are ioctls), the serial device */
  "ioctl", "read", "write", "readv", "writev", "pread64", "pwrite64", "poll", "ppoll",
  "lseek", "close", "fstat", "newfstatat", "fcntl",
  /* clocks and sleeping (clock_gettime is a vDSO call that may fall back) */
  "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday",
  /* signals and the run loop's timeout timer */
  "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall",
  "timer_create", "timer_settime", "timer_gettime", "timer_getoverrun", "timer_delete",
  "gettid", "getpid", "tgkill",
  /* virtio devices: virtio-blk's requests (one preadv/pwritev each) and
     FLUSH, its DISCARD and WRITE_ZEROES (fallocate), virtio-rng's entropy */
  "preadv", "pwritev", "fdatasync", "fallocate", "getrandom",
  /* Lua's allocator (glibc malloc) and guest memory */
  "mmap", "munmap", "mremap", "brk", "madvise", "mprotect",
  /* threads (vm:run: clone is allowed for threads only, below), scheduling, leaving */
  "futex", "sched_yield", "exit", "exit_group", "set_robust_list", "rseq", "sched_getaffinity",
  /* a later kvm.sandbox{} adds a filter, which can only narrow this one */
  "seccomp",
  NULL
};

static int find_nr(const char *name) {
  for (const Sysname *s = sysnames; s->name; s++)
    if (strcmp(s->name, name) == 0) return s->nr;
  return -1;
}

/* the numbers to allow, without duplicates, in a Lua-owned buffer */
typedef struct Allow { int n; int nr[512]; } Allow;

static void add_nr(Allow *a, int nr) {
  for (int i = 0; i < a->n; i++) if (a->nr[i] == nr) return;
  if (a->n < (int)(sizeof a->nr / sizeof a->nr[0])) a->nr[a->n++] = nr;
}

/*** Install a seccomp-bpf filter: from now on this process may only make
the system calls a running VMM needs, plus those named in `allow`.
Call it after everything is set up (VMs, memory, vCPUs, files opened):
opening files and creating VMs are not allowed afterwards unless named.
@function sandbox
@tparam[opt] table opts `allow` = array of system call names to allow too
  (e.g. {"openat"}); `action` = "eperm" (default: a forbidden call fails with
  EPERM, "Operation not permitted") or "kill" (the process is killed with
  SIGSYS)
@treturn true
@return[2] fail, "seccomp: ...", errno (the kernel refused the filter)
@raise an unknown system call name or action
*/
int l_sandbox(lua_State *L) {
#ifndef SANDBOX_ARCH
  errno = ENOSYS;
  return kvm_fail(L, "seccomp (x86-64 only)");
#else
  int arg = 1;
  if (luaL_testudata(L, 1, VM_MT)) arg = 2;      /* vm:sandbox{...} */
  lua_settop(L, arg);                            /* the options, or nil */
  uint32_t deny = SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA);
  Allow *a = lua_newuserdatauv(L, sizeof(Allow), 0);   /* freed by the GC */
  int top = lua_gettop(L);
  a->n = 0;
  for (int i = 0; base_allow[i]; i++) {
    int nr = find_nr(base_allow[i]);
    if (nr >= 0) add_nr(a, nr);
  }
  if (!lua_isnoneornil(L, arg)) {
    luaL_checktype(L, arg, LUA_TTABLE);
    lua_getfield(L, arg, "action");
    if (!lua_isnil(L, -1)) {
      const char *act = lua_tostring(L, -1);
      if (act && strcmp(act, "kill") == 0) deny = SECCOMP_RET_KILL_PROCESS;
      else if (!act || strcmp(act, "eperm") != 0)
        return luaL_error(L, "bad option 'action' to 'sandbox' (\"eperm\" or \"kill\" expected)");
    }
    lua_getfield(L, arg, "allow");
    if (!lua_isnil(L, -1)) {
      if (!lua_istable(L, -1))
        return luaL_error(L, "bad option 'allow' to 'sandbox' (table of system call names expected)");
      lua_Integer n = luaL_len(L, -1);
      for (lua_Integer i = 1; i <= n; i++) {
        if (lua_rawgeti(L, -1, i) != LUA_TSTRING)
          return luaL_error(L, "bad option 'allow' to 'sandbox' (entry %d is not a string)", (int)i);
        int nr = find_nr(lua_tostring(L, -1));
        if (nr < 0)
          return luaL_error(L, "bad option 'allow' to 'sandbox' (unknown system call '%s')",
                            lua_tostring(L, -1));
        add_nr(a, nr);
        lua_pop(L, 1);
      }
    }
    lua_settop(L, top);
  }

  /* the program: the architecture, x32, then one test per allowed number.
     Every jump is short (BPF jump offsets are 8 bits). */
  size_t len = 6 + 7 + 2 * (size_t)a->n + 1;
  struct sock_filter *f = lua_newuserdatauv(L, len * sizeof *f, 0);
  size_t k = 0;
  f[k++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
  f[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SANDBOX_ARCH, 1, 0);
  f[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, deny);
  f[k++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
  f[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, X32_SYSCALL_BIT, 0, 1);
  f[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, deny);
  /* vm:run's threads: clone3 says ENOSYS (its flags are in memory, where a
     filter cannot look), so glibc falls back to clone, allowed with
     CLONE_THREAD (a thread), refused without (a new process) */
  f[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone3, 0, 1);
  f[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA));
  int clone_named = 0;            /* allow = {"clone"}: every clone, as asked */
  for (int i = 0; i < a->n; i++) clone_named |= a->nr[i] == __NR_clone;
  if (!clone_named) {
    f[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone, 0, 4);
    f[k++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0]));
    f[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, CLONE_THREAD, 0, 1);
    f[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    f[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, deny);
  }
  for (int i = 0; i < a->n; i++) {
    f[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)a->nr[i], 0, 1);
    f[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
  }
  f[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, deny);
  struct sock_fprog prog = { .len = (unsigned short)k, .filter = f };

  /* a second call finds prctl forbidden by the first, and no_new_privs
     already set: seccomp() itself says whether the filter may go on */
  int nnp = prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
  int nnp_errno = errno;
  /* every thread at once where the kernel can; else this thread (a
     single-threaded Lua process: the same thing) */
  long r = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog);
  if (r > 0) {              /* thread r could not be synchronised */
    errno = EAGAIN;
    return kvm_fail(L, "seccomp: another thread cannot take the filter");
  }
  if (r < 0 && (errno == ENOSYS || errno == EINVAL))
    r = prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0);
  if (r < 0) {
    if (nnp != 0 && errno == EACCES) { errno = nnp_errno; return kvm_fail(L, "prctl(PR_SET_NO_NEW_PRIVS)"); }
    return kvm_fail(L, "seccomp");
  }
  lua_pushboolean(L, 1);
  return 1;
#endif
}
