/*
** snapshot.h - a VM's saved state: what vm:snapshot() takes and
** vm:restore() puts back (snapshot.c), and its file form (snapfile.c).
**
** A snapshot is a list of parts, each the state of one thing: the VM's
** (irqchip, PIT, clock), a vCPU's, a device's, and guest memory. A VM or
** vCPU part is a list of records {u32 tag, u32 len, len bytes} whose
** payloads are the kernel's own structs (linux/kvm.h: an ABI); a device's
** part is what its DeviceOps.save wrote, a version first. Memory is kept
** apart: a copy of each region, with a bit per page that is not all zeroes.
**
** Model: Firecracker's snapshot (a versioned state file plus a memory file),
** QEMU's order of KVM_SET_* calls on restore; the KVM API document for what
** must be saved (KVM_GET_MSR_INDEX_LIST, immediate_exit to complete I/O).
*/
#ifndef LUAKVM_SNAPSHOT_H
#define LUAKVM_SNAPSHOT_H

#include <stddef.h>
#include <stdint.h>

#include "luakvm.h"

#define SNAPSHOT_MT      "kvm.snapshot"
#define SNAP_PAGE        4096u

/* part kinds */
enum { SNAP_VM = 1, SNAP_VCPU = 2, SNAP_DEVICE = 3 };

/* record tags in a SNAP_VCPU part */
enum {
  SNAP_R_MP_STATE = 1,    /* struct kvm_mp_state */
  SNAP_R_REGS,            /* struct kvm_regs */
  SNAP_R_SREGS,           /* struct kvm_sregs */
  SNAP_R_XSAVE,           /* struct kvm_xsave, or longer (KVM_GET_XSAVE2) */
  SNAP_R_FPU,             /* struct kvm_fpu (no XSAVE) */
  SNAP_R_XCRS,            /* struct kvm_xcrs */
  SNAP_R_DEBUGREGS,       /* struct kvm_debugregs */
  SNAP_R_LAPIC,           /* struct kvm_lapic_state */
  SNAP_R_EVENTS,          /* struct kvm_vcpu_events */
  SNAP_R_MSRS,            /* pairs {u32 index, u32 pad, u64 value} */
  SNAP_R_CPUID,           /* struct kvm_cpuid_entry2[] */
  SNAP_R_TSC_KHZ,         /* u32 */
};

/* record tags in the SNAP_VM part */
enum {
  SNAP_R_PIC_MASTER = 1,  /* struct kvm_irqchip, chip_id 0 */
  SNAP_R_PIC_SLAVE,       /* ... 1 */
  SNAP_R_IOAPIC,          /* ... 2 */
  SNAP_R_PIT,             /* struct kvm_pit_state2 */
  SNAP_R_CLOCK,           /* struct kvm_clock_data */
};

/* a growing byte buffer: a failed allocation sets oom, later puts do nothing */
typedef struct SnapBuf {
  uint8_t *p;
  size_t n, cap;
  int oom;
} SnapBuf;
void snapbuf_put(SnapBuf *b, const void *p, size_t n);
void snapbuf_u32(SnapBuf *b, uint32_t v);
void snapbuf_u64(SnapBuf *b, uint64_t v);
void snapbuf_record(SnapBuf *b, uint32_t tag, const void *p, uint32_t len);

/* reading one back: a short read sets bad and gives zeroes */
typedef struct SnapRd {
  const uint8_t *p;
  size_t n, off;
  int bad;
} SnapRd;
void snaprd_get(SnapRd *r, void *dst, size_t n);
uint32_t snaprd_u32(SnapRd *r);
uint64_t snaprd_u64(SnapRd *r);
/* the next record of a VM or vCPU part: 1 with *tag, *p, *len; 0 at the
   end; -1 for one that runs past the part */
int snaprd_record(SnapRd *r, uint32_t *tag, const uint8_t **p, uint32_t *len);

typedef struct SnapPart {
  uint32_t kind;                 /* SNAP_* */
  uint32_t id;                   /* a vCPU's id; a device's place on the bus (0..) */
  char name[32];                 /* a device's DeviceOps.kind, NUL-terminated; "" else */
  uint64_t addr;                 /* a device's first claimed address; bit 63: MMIO */
  uint8_t *data;                 /* malloc'd */
  size_t len;
} SnapPart;

typedef struct SnapMem {
  uint32_t slot, flags;          /* KVM_MEM_* flags as the region had them */
  uint64_t guest, size;
  uint8_t *pages;                /* mmap'd anonymous, size bytes; zero pages never written */
  uint64_t *nonzero;             /* (size / 4096 + 63) / 64 words: page not all zeroes */
} SnapMem;

typedef struct Snapshot {
  SnapPart *parts;               /* malloc'd */
  int nparts;
  SnapMem mem[KVM_MAX_REGIONS];
  int nmem;
  char *meta;                    /* the user's string (snap.meta), malloc'd, or NULL */
  size_t metalen;
  uint64_t id;                   /* unique in this process: a VM's baseline */
  int trusted;                   /* made by vm:snapshot here: KVM gave every value */
} Snapshot;

/* a new empty snapshot userdata on the stack (parts added with snap_add_part,
   memory with snap_add_mem); freed by its __gc */
Snapshot *snap_push(lua_State *L);
/* append a part (takes data, malloc'd); NULL when out of memory (data freed) */
SnapPart *snap_add_part(Snapshot *s, uint32_t kind, uint32_t id, const char *name, uint64_t addr,
                        uint8_t *data, size_t len);
/* a memory copy of size bytes (zero-filled, nothing allocated yet); NULL
   when the snapshot has KVM_MAX_REGIONS already or mmap fails */
SnapMem *snap_add_mem(Snapshot *s, uint32_t slot, uint32_t flags, uint64_t guest, uint64_t size);
Snapshot *snap_check(lua_State *L, int arg);

/* snapfile.c: snap:save(path) and kvm.load_snapshot(path) */
int  l_snap_save(lua_State *L);
int  l_load_snapshot(lua_State *L);
/* the same from an open file (the fuzz harness: a memfd), read from offset
   0 whatever the fd's offset: pushes a snapshot userdata (1), or fail, a
   message naming `name` and an errno (3); never raises for a bad file */
int  snap_load_fd(lua_State *L, int fd, const char *name);
/* does this host (kvm_fd: /dev/kvm) have every CPU feature the snapshot's
   vCPUs' CPUID records give them (KVM_GET_SUPPORTED_CPUID; snapfile.c says
   which bits are left out and why)? 0, or -1 with errno (ENOTSUP: a
   feature missing) and a message in err: "vCPU 0 needs CPU features this
   host's KVM lacks: CPUID 0x7.0 EBX bit 5 (avx2)" */
int  snap_check_cpu(const Snapshot *s, int kvm_fd, char *err, size_t errlen);
/* snap:save and snap.meta (__index, __newindex) into the class kvm_open_snapshot made */
void kvm_open_snapfile(lua_State *L);

#endif
