/*
** floor.c - the bare C reference for `make bench`: what KVM costs with no
** VMM around it. Same guests as bench/bench.lua, same ioctls, no Lua.
**
**   floor exits N      a real-mode guest loops "out dx, al" to port 0x3ff;
**                      KVM_RUN N times; prints "exits N seconds"
**   floor mmio N       a real-mode guest loops a 32-bit write to 0xd0064
**                      (no memory there: an MMIO exit); KVM_RUN N times;
**                      prints "mmio N seconds"
**   floor ioeventfd N  the guest writes 0xd0050 N times, a KVM_IOEVENTFD
**                      there (KVM signals an eventfd in the kernel, no exit
**                      to user space), then 0xd0064 once; one KVM_RUN to that
**                      exit; prints "ioeventfd N seconds"
**   floor irqline N    a VM with the in-kernel irqchip: N times KVM_IRQ_LINE
**                      GSI 16 high, then low (what a virtio device's interrupt
**                      costs the VMM now); prints "irqline N seconds" (per pair)
**   floor eventfd N    N writes of 1 to an eventfd (what signalling a
**                      KVM_IRQFD would cost instead); prints "eventfd N seconds"
**   floor lifecycle N  N times: create a VM with 64 KiB of memory and one
**                      vCPU, run a 5-byte real-mode guest to HLT, destroy;
**                      prints "lifecycle N seconds"
**   floor memcpy FILE  map FILE, memcpy it into anonymous memory;
**                      prints "memcpy BYTES seconds"
**   floor reset N      a 64 MiB VM whose 32-bit guest increments a dword in
**                      each of 4 pages and halts; N times: run it, then reset
**                      it (timed): memcpy the 4 pages back from a copy kept
**                      at the start, KVM_SET_REGS, KVM_SET_SREGS; prints
**                      "reset N median_seconds mean_seconds" (per reset)
*/
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what) { perror(what); exit(1); }

struct vm { int kvm, fd, cpu; uint8_t *mem; size_t memsz; struct kvm_run *run; size_t runsz; };

static void vm_open(struct vm *v, int kvm, const uint8_t *code, size_t n) {
  v->kvm = kvm;
  v->fd = ioctl(kvm, KVM_CREATE_VM, 0);
  if (v->fd < 0) die("KVM_CREATE_VM");
  v->memsz = 64 << 10;
  v->mem = mmap(NULL, v->memsz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (v->mem == MAP_FAILED) die("mmap");
  memcpy(v->mem + 0x1000, code, n);
  struct kvm_userspace_memory_region r = { .slot = 0, .guest_phys_addr = 0,
    .memory_size = v->memsz, .userspace_addr = (uint64_t)(uintptr_t)v->mem };
  if (ioctl(v->fd, KVM_SET_USER_MEMORY_REGION, &r) < 0) die("KVM_SET_USER_MEMORY_REGION");
  v->cpu = ioctl(v->fd, KVM_CREATE_VCPU, 0);
  if (v->cpu < 0) die("KVM_CREATE_VCPU");
  v->runsz = (size_t)ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  v->run = mmap(NULL, v->runsz, PROT_READ | PROT_WRITE, MAP_SHARED, v->cpu, 0);
  if (v->run == MAP_FAILED) die("mmap run");
  struct kvm_sregs s;
  if (ioctl(v->cpu, KVM_GET_SREGS, &s) < 0) die("KVM_GET_SREGS");
  s.cs.base = 0; s.cs.selector = 0;
  s.ds.base = 0; s.ds.selector = 0;
  if (ioctl(v->cpu, KVM_SET_SREGS, &s) < 0) die("KVM_SET_SREGS");
  struct kvm_regs regs = { .rip = 0x1000, .rflags = 2 };
  if (ioctl(v->cpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
}

/* N exits of `reason` after 1000 to warm up: seconds */
static double run_exits(struct vm *v, long n, unsigned reason) {
  for (int i = 0; i < 1000; i++) ioctl(v->cpu, KVM_RUN, 0);
  double t0 = now();
  for (long i = 0; i < n; i++) {
    if (ioctl(v->cpu, KVM_RUN, 0) < 0) die("KVM_RUN");
    if (v->run->exit_reason != reason) { fprintf(stderr, "exit %u\n", v->run->exit_reason); exit(1); }
  }
  return now() - t0;
}

static void vm_close(struct vm *v) {
  munmap(v->run, v->runsz);
  close(v->cpu);
  close(v->fd);
  munmap(v->mem, v->memsz);
}

/* the reset guest, loaded at 0x1000 and run in flat 32-bit protected mode
   (the same bytes as bench.lua's RESET_GUEST) */
static const uint8_t reset_code[] = {
  0xff, 0x05, 0x00, 0x00, 0x10, 0x00,   /* inc dword [0x100000] */
  0xff, 0x05, 0x00, 0x00, 0x80, 0x00,   /* inc dword [0x800000] */
  0xff, 0x05, 0x00, 0x00, 0x00, 0x02,   /* inc dword [0x2000000] */
  0xff, 0x05, 0x00, 0xf0, 0xff, 0x03,   /* inc dword [0x3fff000] */
  0xf4,                                 /* hlt */
};
static const uint64_t reset_pages[4] = { 0x100000, 0x800000, 0x2000000, 0x3fff000 };
#define RESET_MEM (64u << 20)

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static void reset_bench(int kvm, long n) {
  int fd = ioctl(kvm, KVM_CREATE_VM, 0);
  if (fd < 0) die("KVM_CREATE_VM");
  uint8_t *mem = mmap(NULL, RESET_MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                      -1, 0);
  if (mem == MAP_FAILED) die("mmap");
  memcpy(mem + 0x1000, reset_code, sizeof reset_code);
  struct kvm_userspace_memory_region r = { .slot = 0, .guest_phys_addr = 0,
    .memory_size = RESET_MEM, .userspace_addr = (uint64_t)(uintptr_t)mem };
  if (ioctl(fd, KVM_SET_USER_MEMORY_REGION, &r) < 0) die("KVM_SET_USER_MEMORY_REGION");
  int cpu = ioctl(fd, KVM_CREATE_VCPU, 0);
  if (cpu < 0) die("KVM_CREATE_VCPU");
  size_t runsz = (size_t)ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  struct kvm_run *run = mmap(NULL, runsz, PROT_READ | PROT_WRITE, MAP_SHARED, cpu, 0);
  if (run == MAP_FAILED) die("mmap run");
  /* flat 32-bit protected mode, as x86.protected_mode sets it (no GDT in
     memory is needed: the guest loads no segment) */
  struct kvm_sregs s;
  if (ioctl(cpu, KVM_GET_SREGS, &s) < 0) die("KVM_GET_SREGS");
  struct kvm_segment code = { .base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 11,
    .present = 1, .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1 };
  struct kvm_segment data = code;
  data.selector = 0x18;
  data.type = 3;
  s.cs = code;
  s.ds = s.es = s.fs = s.gs = s.ss = data;
  s.cr0 = 0x33;                 /* PE MP ET NE */
  if (ioctl(cpu, KVM_SET_SREGS, &s) < 0) die("KVM_SET_SREGS");
  struct kvm_regs regs = { .rip = 0x1000, .rflags = 2 };
  if (ioctl(cpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
  /* the state to go back to: registers, special registers, the 4 pages */
  if (ioctl(cpu, KVM_GET_SREGS, &s) < 0) die("KVM_GET_SREGS");
  uint8_t *saved = malloc(4 * 4096);
  double *t = malloc(sizeof(double) * (size_t)n);
  if (saved == NULL || t == NULL) die("malloc");
  for (int i = 0; i < 4; i++) memcpy(saved + 4096 * i, mem + reset_pages[i], 4096);
  double sum = 0;
  for (long i = 0; i < n; i++) {
    if (ioctl(cpu, KVM_RUN, 0) < 0) die("KVM_RUN");
    if (run->exit_reason != KVM_EXIT_HLT) { fprintf(stderr, "exit %u\n", run->exit_reason); exit(1); }
    /* each run started from the reset state: every counter is 1, not i + 1 */
    for (int k = 0; k < 4; k++) {
      uint32_t v;
      memcpy(&v, mem + reset_pages[k], 4);
      if (v != 1) {
        fprintf(stderr, "reset: run %ld: page 0x%llx holds %u, 1 expected\n", i + 1,
                (unsigned long long)reset_pages[k], v);
        exit(1);
      }
    }
    double t0 = now();
    for (int k = 0; k < 4; k++) memcpy(mem + reset_pages[k], saved + 4096 * k, 4096);
    if (ioctl(cpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
    if (ioctl(cpu, KVM_SET_SREGS, &s) < 0) die("KVM_SET_SREGS");
    t[i] = now() - t0;
    sum += t[i];
  }
  qsort(t, (size_t)n, sizeof *t, cmp_double);
  printf("reset %ld %.9f %.9f\n", n, t[(n - 1) / 2], sum / (double)n);
  free(t);
  free(saved);
  munmap(run, runsz);
  close(cpu);
  close(fd);
  munmap(mem, RESET_MEM);
}

int main(int argc, char **argv) {
  if (argc < 3) { fprintf(stderr, "usage: floor exits|mmio|ioeventfd|irqline|eventfd|lifecycle|reset N | memcpy FILE\n"); return 2; }
  if (strcmp(argv[1], "memcpy") == 0) {
    int fd = open(argv[2], O_RDONLY | O_CLOEXEC);
    if (fd < 0) die(argv[2]);
    struct stat st;
    fstat(fd, &st);
    double t0 = now();
    void *src = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    uint8_t *dst = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (src == MAP_FAILED || dst == MAP_FAILED) die("mmap");
    memcpy(dst, src, (size_t)st.st_size);
    double t1 = now();
    printf("memcpy %lld %.9f\n", (long long)st.st_size, t1 - t0);
    return 0;
  }
  long n = atol(argv[2]);
  int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) die("/dev/kvm");
  if (strcmp(argv[1], "exits") == 0) {
    /* mov dx, 0x3ff ; l: out dx, al ; jmp l */
    static const uint8_t code[] = { 0xba, 0xff, 0x03, 0xee, 0xeb, 0xfd };
    struct vm v;
    vm_open(&v, kvm, code, sizeof code);
    printf("exits %ld %.9f\n", n, run_exits(&v, n, KVM_EXIT_IO));
    vm_close(&v);
  } else if (strcmp(argv[1], "mmio") == 0) {
    /* mov ax, 0xd000 ; mov ds, ax ; l: mov [0x64], eax ; jmp l */
    static const uint8_t code[] = { 0xb8, 0x00, 0xd0, 0x8e, 0xd8, 0x66, 0xa3, 0x64, 0x00, 0xeb, 0xfa };
    struct vm v;
    vm_open(&v, kvm, code, sizeof code);
    printf("mmio %ld %.9f\n", n, run_exits(&v, n, KVM_EXIT_MMIO));
    vm_close(&v);
  } else if (strcmp(argv[1], "ioeventfd") == 0) {
    /* mov ax, 0xd000 ; mov ds, ax ; mov ecx, N ;
       l: mov [0x50], eax ; dec ecx ; jnz l ; mov [0x64], eax ; jmp $ */
    uint8_t code[] = { 0xb8, 0x00, 0xd0, 0x8e, 0xd8, 0x66, 0xb9, 0, 0, 0, 0,
                       0x66, 0xa3, 0x50, 0x00, 0x66, 0x49, 0x75, 0xf8,
                       0x66, 0xa3, 0x64, 0x00, 0xeb, 0xfe };
    uint32_t cnt = (uint32_t)n;
    memcpy(code + 7, &cnt, 4);
    struct vm v;
    vm_open(&v, kvm, code, sizeof code);
    int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (efd < 0) die("eventfd");
    struct kvm_ioeventfd io = { .addr = 0xd0050, .len = 4, .fd = efd };
    if (ioctl(v.fd, KVM_IOEVENTFD, &io) < 0) die("KVM_IOEVENTFD");
    double t0 = now();
    if (ioctl(v.cpu, KVM_RUN, 0) < 0) die("KVM_RUN");
    double t1 = now();
    if (v.run->exit_reason != KVM_EXIT_MMIO || v.run->mmio.phys_addr != 0xd0064) {
      fprintf(stderr, "exit %u\n", v.run->exit_reason);
      return 1;
    }
    uint64_t signalled = 0;
    if (read(efd, &signalled, sizeof signalled) != sizeof signalled || signalled != (uint64_t)n) {
      fprintf(stderr, "eventfd counted %llu of %ld\n", (unsigned long long)signalled, n);
      return 1;
    }
    printf("ioeventfd %ld %.9f\n", n, t1 - t0);
    close(efd);
    vm_close(&v);
  } else if (strcmp(argv[1], "irqline") == 0) {
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");
    double t0 = now();
    for (long i = 0; i < n; i++) {
      struct kvm_irq_level hi = { .irq = 16, .level = 1 }, lo = { .irq = 16, .level = 0 };
      if (ioctl(vm, KVM_IRQ_LINE, &hi) < 0 || ioctl(vm, KVM_IRQ_LINE, &lo) < 0) die("KVM_IRQ_LINE");
    }
    double t1 = now();
    printf("irqline %ld %.9f\n", n, t1 - t0);
    close(vm);
  } else if (strcmp(argv[1], "eventfd") == 0) {
    int efd = eventfd(0, EFD_CLOEXEC);
    if (efd < 0) die("eventfd");
    uint64_t one = 1;
    double t0 = now();
    for (long i = 0; i < n; i++)
      if (write(efd, &one, sizeof one) != sizeof one) die("write eventfd");
    double t1 = now();
    printf("eventfd %ld %.9f\n", n, t1 - t0);
    close(efd);
  } else if (strcmp(argv[1], "lifecycle") == 0) {
    /* mov al, 1 ; out 0x80? no: 5 bytes: nop; nop; nop; nop; hlt */
    static const uint8_t code[] = { 0x90, 0x90, 0x90, 0x90, 0xf4 };
    double t0 = now();
    for (long i = 0; i < n; i++) {
      struct vm v;
      vm_open(&v, kvm, code, sizeof code);
      if (ioctl(v.cpu, KVM_RUN, 0) < 0) die("KVM_RUN");
      if (v.run->exit_reason != KVM_EXIT_HLT) { fprintf(stderr, "exit %u\n", v.run->exit_reason); return 1; }
      vm_close(&v);
    }
    double t1 = now();
    printf("lifecycle %ld %.9f\n", n, t1 - t0);
  } else if (strcmp(argv[1], "reset") == 0 && n > 0) {
    reset_bench(kvm, n);
  }
  close(kvm);
  return 0;
}
