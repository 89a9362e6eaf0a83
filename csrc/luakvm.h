/*
** luakvm.h - private types shared by the C files of kvm.core.
** Only luaopen_kvm_core is exported (see core.c); everything here is
** hidden with -fvisibility=hidden.
*/
#ifndef LUAKVM_H
#define LUAKVM_H

#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <termios.h>
#include <linux/kvm.h>

#include "lua.h"
#include "lauxlib.h"

#define VM_MT      "kvm.vm"
#define MEMORY_MT  "kvm.memory"
#define VCPU_MT    "kvm.vcpu"
#define EXIT_MT    "kvm.exit"

#define KVM_MAX_REGIONS   32     /* memory slots a VM may hold */
#define KVM_MAX_RANGES    64     /* claimed port ranges / mmio ranges */

/* what owns a port or MMIO range */
enum { H_NONE = 0, H_LUA, H_SERIAL, H_LEGACY, H_DEBUGEXIT };

typedef struct Range {
  uint64_t first, last;          /* inclusive */
  int kind;                      /* H_* */
  int ref;                       /* H_LUA: index in the VM's handler table */
  void *dev;                     /* device state for C devices */
  uint64_t hits;                 /* accesses dispatched to this range */
} Range;

typedef struct Memory Memory;
struct Vm;

/* 16550A UART (serial.c) */
#define SERIAL_OUTBUF 4096
#define SERIAL_FIFO   16         /* a 16550A: Linux's size_fifo() must count 16 */
typedef struct Serial {
  int enabled;
  uint16_t port;
  int irq;
  uint8_t ier, iir, fcr, lcr, mcr, lsr, msr, scr, dll, dlm;
  uint8_t rbr;                   /* last byte read from the receiver */
  int thri_pending;              /* THR-empty interrupt waiting for IIR read */
  int irq_level;                 /* last level driven on the irq line */
  uint8_t rx[SERIAL_FIFO];
  int rx_head, rx_count;
  uint8_t held[2 * SERIAL_FIFO]; /* typed bytes a FIFO reset took back, oldest first */
  int held_len;
  int lsr_polls;                 /* LSR reads in a row: a driver polling for input */
  char out[SERIAL_OUTBUF];
  size_t out_len;
  uint64_t out_first_ns;         /* when the oldest unflushed byte was written */
  int in_fd;                     /* -1: no input */
  int in_eof;
  luaL_Stream *in_stream;        /* the input FILE (pinned as "serial_in") */
  int out_kind;                  /* 0 none, 1 FILE (luaL_Stream), 2 Lua function */
  /* Lua-side objects (stream, function) live in the VM's uservalue table,
     under the keys "serial_out" / "serial_in". */
  int flush_wanted;               /* set by serial_io: newline or buffer full */
  int tty_saved;                 /* saved_tios holds the input tty's modes */
  struct termios saved_tios;
  uint64_t tx_bytes, rx_bytes;
  uint64_t tx_dropped, rx_overruns;
} Serial;

/* legacy PC ports (legacy.c) */
#define LEGACY_I8042  0x01
#define LEGACY_PCI    0x02
#define LEGACY_CMOS   0x04
#define LEGACY_POST   0x08
#define LEGACY_PORT61 0x10
#define LEGACY_KBDQ   8          /* i8042 output queue */
typedef struct Legacy {
  int enabled;
  unsigned parts;                /* LEGACY_* claimed by vm:legacy_ports */
  uint8_t port61;
  uint8_t i8042_cmd;             /* command waiting for its data byte, or 0 */
  uint8_t i8042_status;          /* status flags besides OBF/AUXDATA/TIMEOUT */
  uint8_t i8042_out;             /* last byte read from port 0x60 */
  uint8_t i8042_ctr;             /* controller command byte */
  uint8_t i8042_outport;         /* output port (bit 0: reset, bit 1: A20) */
  uint8_t kbdq[LEGACY_KBDQ];     /* pending output bytes ... */
  uint8_t kbdq_flags[LEGACY_KBDQ]; /* ... 1: from the aux port, 2: timeout */
  int kbdq_head, kbdq_count;
  int irq1_level, irq12_level;
  uint8_t cmos_index;
  uint8_t cmos_nmi_masked;
  uint8_t cmos_ram[128];
  int64_t rtc_offset;            /* guest clock minus host clock, seconds */
  uint32_t pci_addr;
  uint8_t pci_rcr;               /* 0xcf9 reset control register */
  uint8_t post_last;
  uint64_t markers_dropped;
  int reset_requested;
} Legacy;

#define MAX_MARKERS 256
typedef struct Marker { uint8_t code; uint64_t ns; } Marker;

typedef struct VmStats {
  uint64_t exits_by_reason[64];
  uint64_t unclaimed_io, unclaimed_mmio;
  uint64_t ns_in_run, ns_in_handlers;
  uint64_t io_by_port_count[KVM_MAX_RANGES]; /* parallel to io ranges */
} VmStats;

/*
** The VM userdata's uservalue 1 is a table holding the Lua objects the VM
** keeps alive: [integer id] = Lua I/O and MMIO handler functions (Range.ref),
** "memories" = table of Memory userdata, "serial_out" / "serial_in" = the
** serial device's output (FILE handle or function) and input (FILE handle).
*/
typedef struct Vm {
  int fd;                        /* VM fd, -1 when closed */
  int kvm_fd;                    /* /dev/kvm */
  int run_size;                  /* KVM_GET_VCPU_MMAP_SIZE */
  Memory *regions[KVM_MAX_REGIONS];
  Range io[KVM_MAX_RANGES];  int nio;     /* sorted by first */
  Range mmio[KVM_MAX_RANGES]; int nmmio;  /* sorted by first */
  int in_handler;                /* a Lua handler is running */
  int running;                   /* vcpus inside run() */
  int has_irqchip;
  uint64_t created_ns;
  Serial serial;
  Legacy legacy;
  uint16_t debug_exit_port;
  Marker markers[MAX_MARKERS]; int nmarkers;
  VmStats stats;
  uint32_t *port_hits;           /* 65536 counters, every port-I/O element seen */
} Vm;

struct Memory {
  Vm *vm;                        /* valid while open; the VM is pinned by uservalue 1 */
  uint8_t *host;                 /* NULL when closed */
  uint64_t guest, size;
  uint32_t slot, flags;
  int vm_closed;
};

typedef struct Vcpu {
  int fd;                        /* -1 when closed */
  int id;
  Vm *vm;                        /* pinned by uservalue 1 */
  struct kvm_run *run;
  size_t run_size;
  int running;
  volatile int stop;
  uint64_t seq;                  /* bumped on every KVM_RUN; exits remember it */
  uint64_t exits, ns_in_run, ns_in_handlers;
  uint64_t exits_by_reason[64];
} Vcpu;

/* helpers (core.c) */
uint64_t kvm_now_ns(void);
int kvm_fail(lua_State *L, const char *what);          /* nil, msg, errno */
uint64_t kvm_checkrange(lua_State *L, int arg, uint64_t lo, uint64_t hi, const char *what);
Vm *kvm_checkvm(lua_State *L, int arg);                 /* open VM or raise */
Vcpu *kvm_checkvcpu(lua_State *L, int arg);
/* host pointer for [gpa, gpa+len) when one region holds it all, else NULL */
uint8_t *kvm_gpa_ptr(Vm *vm, uint64_t gpa, uint64_t len);

/* claim [first, last] of the port or MMIO space for a handler; raises
   "port 0x25 already claimed by 0x20-0x2f" on overlap (vm.c) */
void kvm_claim(lua_State *L, Vm *vm, int is_mmio, uint64_t first, uint64_t last,
               int kind, int ref, void *dev);

int kvm_checkcap(lua_State *L, int arg);
const char *kvm_pushhex(lua_State *L, uint64_t v);     /* pushes "0x1f", returns it */
void kvm_push_cpuid(lua_State *L, const struct kvm_cpuid_entry2 *e, int n);
extern int kvm_stop_keys[3];            /* kvm.STOP, kvm.POWEROFF, kvm.RESET */
extern const char *const kvm_stop_reasons[];  /* "none", then their run() reasons */
int l_vm_new(lua_State *L);
Memory *kvm_checkmemory(lua_State *L, int arg);

/* module parts */
void kvm_open_vm(lua_State *L);       /* vm.c */
void kvm_open_memory(lua_State *L);   /* mem.c */
void kvm_open_vcpu(lua_State *L);     /* vcpu.c */
void kvm_open_exit(lua_State *L);     /* exit.c */
int  kvm_push_exit(lua_State *L, int vcpu_idx, Vcpu *c, const char *reason_override);
/* the data of the current port-I/O exit, size * count bytes (*bytes), when
   KVM's size, count and data_offset put it inside the kvm_run mapping past
   its header; NULL for a malformed exit (exit.c) */
uint8_t *kvm_io_data(const Vcpu *c, uint64_t *bytes);
int  kvm_elf_load(lua_State *L);      /* elf.c: vm:load_elf(path) */

/* serial.c */
void serial_reset(Serial *s);
void serial_io(Vm *vm, Serial *s, unsigned off, int is_write, uint8_t *val);
int  serial_poll_input(Vm *vm, Serial *s);             /* 1 if bytes arrived */
/* hand buffered output to the FILE or function; vm_idx: the VM userdata on the
   stack; msgh: stack index of a message handler or 0. LUA_OK, or an error
   status with the message on the stack top. Sets s->flush_wanted = 0. */
int  serial_flush(lua_State *L, Vm *vm, int vm_idx, int msgh);
int  l_vm_serial(lua_State *L);                      /* vm:serial{...} */
void serial_begin_run(Serial *s);                     /* raw mode on a tty input */
void serial_end_run(Serial *s);                       /* restore the terminal; idempotent */
void serial_close(Serial *s);                         /* at vm close: restore, forget fds */

/* legacy.c */
void legacy_reset(Legacy *lg);
/* returns 0 normally, 1 when the guest asked for a reset */
int  legacy_io(Vm *vm, Legacy *lg, uint16_t port, int is_write, unsigned size, uint8_t *data);
int  l_vm_legacy_ports(lua_State *L);                 /* vm:legacy_ports{...} */
int  l_vm_boot_markers(lua_State *L);                 /* vm:boot_markers() */

/* sandbox.c */
int  l_sandbox(lua_State *L);                         /* kvm.sandbox{allow=, action=} */

#endif
