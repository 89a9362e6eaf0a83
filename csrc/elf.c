/*
** elf.c - vm:load_elf(path [, opts]): load an ELF64 x86-64 executable (a
** vmlinux, a test guest) into guest memory, segment by segment.
**
** The file is mapped read-only and parsed with libelf; the bytes go from the
** mapping straight into guest memory, never through Lua strings.  Every
** check is made for every segment before the first byte is written, so a bad
** file leaves guest memory untouched.  Nothing is held across a Lua call
** that can raise: the state (at most ELF_MAX_SEGMENTS PT_LOAD segments) lives
** in a userdata made before the file is opened, and the Lua results are
** built after the file is unmapped and closed.
*/

/*** vm:load_elf, below, is a method of kvm.vm.
@classmod kvm.vm
*/
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gelf.h>
#include <libelf.h>

#include "luakvm.h"

#define ELF_MAX_SEGMENTS 64                 /* PT_LOAD segments per file */
#define ELF_MAX_MEMSZ    (UINT64_C(1) << 40) /* larger than any guest we run */

typedef struct Seg {
  uint64_t paddr, vaddr, offset, filesz, memsz, align;
  uint64_t load;                 /* guest address used: paddr or vaddr */
  uint32_t flags;
  int index;                     /* index in the program header table */
  uint8_t *host;                 /* where it goes, NULL when memsz is 0 */
} Seg;

typedef struct Load {
  const char *path;
  Vm *vm;
  int physical;                  /* load at p_paddr (1) or p_vaddr (0) */
  uint64_t size;                 /* file size */
  uint64_t entry, entry_phys;
  int has_entry_phys;
  uint64_t low, high;
  int nseg;
  Seg seg[ELF_MAX_SEGMENTS];
  int err_errno;                 /* 0: a format error */
  char err[256];                 /* the problem, without the file name */
} Load;

static int fail(Load *ld, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* record the problem; always returns -1 */
static int fail(Load *ld, int err, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(ld->err, sizeof ld->err, fmt, ap);
  va_end(ap);
  ld->err_errno = err;
  return -1;
}

static int sys_fail(Load *ld, int err) {
  return fail(ld, err, "%s", strerror(err));
}

static int elf_fail(Load *ld) {
  const char *m = elf_errmsg(-1);
  return fail(ld, 0, "libelf: %s", m ? m : "unknown error");
}

static int seg_by_load(const void *a, const void *b) {
  const Seg *x = a, *y = b;
  if (x->load != y->load) return x->load < y->load ? -1 : 1;
  return x->index - y->index;
}

/* e_ident, class, data encoding, machine and type; the header is whole */
static int check_header(Load *ld, const unsigned char *p) {
  if (ld->size < SELFMAG || memcmp(p, ELFMAG, SELFMAG) != 0)
    return fail(ld, 0, "not an ELF file");
  if (ld->size < EI_NIDENT)
    return fail(ld, 0, "truncated ELF header (%" PRIu64 " bytes)", ld->size);
  if (p[EI_CLASS] == ELFCLASS32)
    return fail(ld, 0, "32-bit ELF, not ELF64");
  if (p[EI_CLASS] != ELFCLASS64)
    return fail(ld, 0, "bad ELF class %d", p[EI_CLASS]);
  if (p[EI_DATA] == ELFDATA2MSB)
    return fail(ld, 0, "big-endian ELF, not little-endian");
  if (p[EI_DATA] != ELFDATA2LSB)
    return fail(ld, 0, "bad ELF data encoding %d", p[EI_DATA]);
  if (ld->size < sizeof(Elf64_Ehdr))
    return fail(ld, 0, "truncated ELF header (%" PRIu64 " bytes)", ld->size);
  return 0;
}

/* check one PT_LOAD segment and find where it goes; touches nothing */
static int check_segment(Load *ld, Seg *s) {
  uint64_t end;
  if (s->filesz > s->memsz)
    return fail(ld, 0, "segment %d: file size 0x%" PRIx64
                " is larger than memory size 0x%" PRIx64,
                s->index, s->filesz, s->memsz);
  if (__builtin_add_overflow(s->offset, s->filesz, &end))
    return fail(ld, 0, "truncated: segment %d (offset 0x%" PRIx64
                " + size 0x%" PRIx64 ") is past the end of the file",
                s->index, s->offset, s->filesz);
  if (end > ld->size)
    return fail(ld, 0, "truncated: segment %d ends at 0x%" PRIx64
                " past the end of the file (0x%" PRIx64 " bytes)",
                s->index, end, ld->size);
  if (s->memsz == 0)
    return 0;
  if (s->memsz > ELF_MAX_MEMSZ)
    return fail(ld, 0, "segment %d: memory size 0x%" PRIx64 " is too large",
                s->index, s->memsz);
  if (__builtin_add_overflow(s->load, s->memsz, &end))
    return fail(ld, 0, "segment %d (0x%" PRIx64 " + 0x%" PRIx64
                ") wraps around the address space",
                s->index, s->load, s->memsz);
  s->host = kvm_gpa_wptr(ld->vm, s->load, s->memsz);
  if (s->host == NULL)
    return fail(ld, 0, "segment %d (0x%" PRIx64 "-0x%" PRIx64
                ") is outside guest memory", s->index, s->load, end);
  return 0;
}

/* read the program headers, check every segment, then copy; -1 on error */
static int load_segments(Load *ld, Elf *elf, const uint8_t *image) {
  GElf_Ehdr eh;
  size_t phnum;
  uint64_t tab, tab_end;
  Seg sorted[ELF_MAX_SEGMENTS];
  int i;

  if (gelf_getehdr(elf, &eh) == NULL)
    return elf_fail(ld);
  if (eh.e_machine != EM_X86_64)
    return fail(ld, 0, "ELF64 for machine %u, not x86-64", eh.e_machine);
  if (eh.e_type != ET_EXEC && eh.e_type != ET_DYN)
    return fail(ld, 0, "ELF type %u (%s), not an executable", eh.e_type,
                eh.e_type == ET_REL ? "relocatable" :
                eh.e_type == ET_CORE ? "core file" : "unknown");
  ld->entry = eh.e_entry;

  /* libelf quietly shortens a table that runs past the end of the file,
     so bound it here, from the header's own numbers */
  if (eh.e_phnum == PN_XNUM) {
    if (elf_getphdrnum(elf, &phnum) != 0)
      return elf_fail(ld);
  } else {
    phnum = eh.e_phnum;
  }
  if (phnum == 0)
    return fail(ld, 0, "no program headers");
  if (eh.e_phentsize != sizeof(Elf64_Phdr))
    return fail(ld, 0, "program header size %u, not %zu",
                eh.e_phentsize, sizeof(Elf64_Phdr));
  if (__builtin_mul_overflow((uint64_t)phnum, sizeof(Elf64_Phdr), &tab) ||
      __builtin_add_overflow(eh.e_phoff, tab, &tab_end))
    return fail(ld, 0, "truncated: program headers (offset 0x%" PRIx64
                ", %zu entries) are past the end of the file",
                (uint64_t)eh.e_phoff, phnum);
  if (tab_end > ld->size)
    return fail(ld, 0, "truncated: program headers end at 0x%" PRIx64
                " past the end of the file (0x%" PRIx64 " bytes)",
                tab_end, ld->size);

  /* pass 1: every check, for every segment */
  ld->nseg = 0;
  for (i = 0; (size_t)i < phnum; i++) {
    GElf_Phdr ph;
    Seg *s;
    if (gelf_getphdr(elf, i, &ph) == NULL)
      return elf_fail(ld);
    if (ph.p_type != PT_LOAD)
      continue;
    if (ld->nseg == ELF_MAX_SEGMENTS)
      return fail(ld, 0, "more than %d loadable segments", ELF_MAX_SEGMENTS);
    s = &ld->seg[ld->nseg++];
    s->paddr = ph.p_paddr;
    s->vaddr = ph.p_vaddr;
    s->offset = ph.p_offset;
    s->filesz = ph.p_filesz;
    s->memsz = ph.p_memsz;
    s->align = ph.p_align;
    s->flags = ph.p_flags;
    s->index = i;
    s->load = ld->physical ? ph.p_paddr : ph.p_vaddr;
    s->host = NULL;
    if (check_segment(ld, s) != 0)
      return -1;
  }
  if (ld->nseg == 0)
    return fail(ld, 0, "no loadable segments");

  /* overlaps: sorted by address, an overlap shows between neighbours */
  {
    int n = 0;
    for (i = 0; i < ld->nseg; i++)
      if (ld->seg[i].memsz != 0)
        sorted[n++] = ld->seg[i];
    qsort(sorted, (size_t)n, sizeof sorted[0], seg_by_load);
    for (i = 0; i + 1 < n; i++)
      if (sorted[i + 1].load - sorted[i].load < sorted[i].memsz) {
        int a = sorted[i].index, b = sorted[i + 1].index;
        return fail(ld, 0, "segments %d and %d overlap",
                    a < b ? a : b, a < b ? b : a);
      }
    if (n > 0) {
      ld->low = sorted[0].load;
      ld->high = 0;
      for (i = 0; i < n; i++)
        if (sorted[i].load + sorted[i].memsz > ld->high)
          ld->high = sorted[i].load + sorted[i].memsz;
    } else {
      ld->low = ld->high = 0;
    }
  }

  /* physical entry: translated through the segment whose virtual range
     holds e_entry; failing that, e_entry already is physical when a
     segment's physical range holds it (x86 vmlinux: e_entry = 0x1000000) */
  ld->has_entry_phys = 0;
  for (i = 0; i < ld->nseg && !ld->has_entry_phys; i++) {
    const Seg *s = &ld->seg[i];
    if (ld->entry - s->vaddr < s->memsz) {
      ld->entry_phys = s->paddr + (ld->entry - s->vaddr);
      ld->has_entry_phys = 1;
    }
  }
  for (i = 0; i < ld->nseg && !ld->has_entry_phys; i++) {
    const Seg *s = &ld->seg[i];
    if (ld->entry - s->paddr < s->memsz) {
      ld->entry_phys = ld->entry;
      ld->has_entry_phys = 1;
    }
  }

  /* pass 2: nothing can fail any more; copy and clear the BSS */
  for (i = 0; i < ld->nseg; i++) {
    const Seg *s = &ld->seg[i];
    if (s->host == NULL)
      continue;
    if (s->filesz)
      memcpy(s->host, image + s->offset, s->filesz);
    if (s->memsz > s->filesz)
      memset(s->host + s->filesz, 0, s->memsz - s->filesz);
  }
  return 0;
}

/* open, map, parse, check, copy, unmap, close; -1 with ld->err on error */
static int load_file(Load *ld) {
  struct stat st;
  void *map = MAP_FAILED;
  Elf *elf = NULL;
  int fd, rc = -1;

  fd = open(ld->path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    sys_fail(ld, errno);
    goto out;
  }
  if (fstat(fd, &st) != 0) {
    sys_fail(ld, errno);
    goto out_close;
  }
  if (S_ISDIR(st.st_mode)) {
    sys_fail(ld, EISDIR);
    goto out_close;
  }
  if (!S_ISREG(st.st_mode)) {
    fail(ld, 0, "not a regular file");
    goto out_close;
  }
  ld->size = (uint64_t)st.st_size;
  if (ld->size < SELFMAG) {        /* also: mmap refuses a length of 0 */
    fail(ld, 0, "not an ELF file");
    goto out_close;
  }
  if (ld->size > SIZE_MAX) {
    fail(ld, 0, "file too large");
    goto out_close;
  }
  map = mmap(NULL, (size_t)ld->size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (map == MAP_FAILED) {
    sys_fail(ld, errno);
    goto out_close;
  }
  if (check_header(ld, map) != 0)
    goto out_unmap;
  if (elf_version(EV_CURRENT) == EV_NONE) {
    elf_fail(ld);
    goto out_unmap;
  }
  /* ELF_C_READ_MMAP semantics: libelf only reads the image */
  elf = elf_memory(map, (size_t)ld->size);
  if (elf == NULL) {
    elf_fail(ld);
    goto out_unmap;
  }
  if (elf_kind(elf) != ELF_K_ELF) {
    fail(ld, 0, "not an ELF file");
    goto out_end;
  }
  rc = load_segments(ld, elf, map);
out_end:
  elf_end(elf);
out_unmap:
  munmap(map, (size_t)ld->size);
out_close:
  close(fd);
out:
  return rc;
}

static void set_int(lua_State *L, const char *k, uint64_t v) {
  lua_pushinteger(L, (lua_Integer)v);
  lua_setfield(L, -2, k);
}

/***
Load an ELF64 x86-64 executable into guest memory.
Every PT_LOAD segment is copied to its physical address (p_paddr) and the
rest of its memory size is zeroed (BSS). All segments are checked first,
so on error guest memory is untouched.
@function vm:load_elf
@tparam string path the file (a vmlinux, a test guest)
@tparam[opt] table opts `physical = false` loads at p_vaddr instead of p_paddr
@treturn table `{entry=, entry_phys=, low=, high=, size=, segments={{paddr=,
 vaddr=, offset=, filesz=, memsz=, align=, flags=, index=}, ...}}`;
 `entry` is e_entry (a kernel's may be virtual, 0xffffffff81000000 is a
 negative integer), `entry_phys` is it translated through the segment whose
 virtual range holds it, or e_entry itself when only a segment's physical
 range holds it (nil when neither does), `low`/`high` bound the loaded
 guest range [low, high), `size` is the file size, `index` is a segment's
 0-based program header index (the one error messages name)
@return[2] nil
@return[2] string "path: problem", e.g. "vmlinux: not an ELF file"
@return[2] integer errno, for system errors (open, mmap)
*/
int kvm_elf_load(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  const char *path = luaL_checkstring(L, 2);
  int physical = 1;
  Load *ld;
  int i;

  if (!lua_isnoneornil(L, 3)) {
    luaL_checktype(L, 3, LUA_TTABLE);
    switch (lua_getfield(L, 3, "physical")) {
      case LUA_TNIL: break;
      case LUA_TBOOLEAN: physical = lua_toboolean(L, -1); break;
      default: return luaL_argerror(L, 3, "'physical' must be a boolean");
    }
    lua_pop(L, 1);
  }

  /* the state is a few KB: keep it in a userdata (freed by the GC whatever
     happens), made before the file is opened so nothing below can raise
     while a resource is held */
  ld = lua_newuserdatauv(L, sizeof *ld, 0);
  memset(ld, 0, sizeof *ld);
  ld->path = path;
  ld->vm = vm;
  ld->physical = physical;

  if (load_file(ld) != 0) {
    /* the file is closed and unmapped by now */
    luaL_pushfail(L);
    lua_pushfstring(L, "%s: %s", path, ld->err);
    if (ld->err_errno == 0)
      return 2;
    lua_pushinteger(L, ld->err_errno);
    return 3;
  }

  lua_createtable(L, 0, 7);
  set_int(L, "entry", ld->entry);
  if (ld->has_entry_phys)
    set_int(L, "entry_phys", ld->entry_phys);
  set_int(L, "low", ld->low);
  set_int(L, "high", ld->high);
  set_int(L, "size", ld->size);
  lua_createtable(L, ld->nseg, 0);
  for (i = 0; i < ld->nseg; i++) {
    const Seg *s = &ld->seg[i];
    lua_createtable(L, 0, 8);
    set_int(L, "paddr", s->paddr);
    set_int(L, "vaddr", s->vaddr);
    set_int(L, "offset", s->offset);
    set_int(L, "filesz", s->filesz);
    set_int(L, "memsz", s->memsz);
    set_int(L, "align", s->align);
    set_int(L, "flags", s->flags);
    set_int(L, "index", (uint64_t)s->index);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "segments");
  return 1;
}
