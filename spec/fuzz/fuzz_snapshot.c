/*
** fuzz_snapshot.c - libFuzzer harness for the snapshot file loader
** (csrc/snapfile.c: snap_load_fd, what kvm.load_snapshot reads with).
**
** The input is a snapshot file, in a memfd. It is loaded twice: as it is,
** and made to agree with itself (every checksum right: the header's, and
** each section's header and payload as far as the lengths reach; the
** header's file length and section count, and END's, what the input has),
** so that a mutation gets past the CRCs and counts to the checks behind
** them (lengths, bitmaps, records, regions, the CPU). The contract checked: a snapshot, or
** fail + "snapshot file fuzz: why" + a positive errno; never a Lua error.
** A snapshot that loads is saved (to /dev/shm), loaded again, and saved
** again: the second file must be the first, byte for byte. ASan/UBSan catch
** the rest; a hostile length must not allocate more than the input holds
** (the run's -rss_limit_mb) nor hang.
**
** The CPU check at the end needs /dev/kvm (a file is refused without it);
** the parser before it does not, so the harness runs anywhere.
*/
#include "fuzz_common.h"

#include "snapshot.h"

static lua_State *L;
static uint8_t *fixed;
static size_t fixed_cap;

static const char *CHECK =
  "local kvm = require 'kvm.core'\n"
  "local f = io.open('/proc/self/stat')\n"
  "local out = '/dev/shm/fuzz_snapshot.' .. math.tointeger(f:read('n'))\n"
  "f:close()\n"
  "local function slurp(p)\n"
  "  local g = assert(io.open(p, 'rb'))\n"
  "  local s = g:read('a')\n"
  "  g:close()\n"
  "  return s\n"
  "end\n"
  "return function(n, snap, msg, en)\n"
  "  if snap == nil then\n"
  "    if n ~= 3 or type(msg) ~= 'string' or msg:sub(1, 20) ~= 'snapshot file fuzz: '\n"
  "       or math.type(en) ~= 'integer' or en <= 0 then\n"
  "      error('a refusal without fail, message, errno: ' .. tostring(msg), 0)\n"
  "    end\n"
  "    return\n"
  "  end\n"
  "  if n ~= 1 then error('a snapshot and more', 0) end\n"
  "  local what, meta = tostring(snap), snap.meta\n"
  "  local ok, err = snap:save(out)\n"
  "  if not ok then error('a loaded snapshot does not save: ' .. err, 0) end\n"
  "  local again, err2 = kvm.load_snapshot(out)\n"
  "  if not again then error('a saved snapshot does not load: ' .. err2, 0) end\n"
  "  if tostring(again) ~= what or again.meta ~= meta then error('the round trip changed it', 0) end\n"
  "  assert(again:save(out .. '.2'))\n"
  "  if slurp(out) ~= slurp(out .. '.2') then error('saved twice, two files', 0) end\n"
  "  os.remove(out)\n"
  "  os.remove(out .. '.2')\n"
  "end\n";

static uint32_t crc_table[256];

static uint32_t crc32c(const uint8_t *p, size_t n) {
  uint32_t c = 0xffffffffu;
  while (n-- > 0) c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
  return ~c;
}

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

/* make the copy in `fixed` agree with itself: every checksum right, the
   header's file length the input's, its section count what comes before
   the first END section (when there is one) */
static void fix_crcs(uint8_t *d, size_t n) {
  if (n < 96) return;
  uint64_t off = 96, len, total = n;
  uint32_t k = 0, kind;
  while (n - off >= 64) {
    uint8_t *h = d + off;
    memcpy(&kind, h, 4);
    memcpy(&len, h + 48, 8);
    if (kind == 255) {
      put32(d + 32, k);
      put32(h + 4, k);
    }
    if (len <= n - off - 64) put32(h + 56, crc32c(h + 64, (size_t)len));
    put32(h + 60, crc32c(h, 60));
    if (kind == 255 || len > n - off - 64) break;
    off += 64 + len;
    k++;
  }
  memcpy(d + 24, &total, 8);
  put32(d + 20, 0);
  put32(d + 20, crc32c(d, 96));
}

/* the loader in a protected call: snap_push raises when out of memory */
static int load(lua_State *l) {
  int fd = (int)lua_tointeger(l, 1);
  lua_settop(l, 0);
  return snap_load_fd(l, fd, "fuzz");
}

static void one(const uint8_t *data, size_t size) {
  fuzz_file(data, size);
  lua_settop(L, 0);
  lua_getfield(L, LUA_REGISTRYINDEX, "fuzz_snapshot");
  lua_pushcfunction(L, load);
  lua_pushinteger(L, fuzz_fd);
  if (lua_pcall(L, 1, LUA_MULTRET, 0) != LUA_OK) fuzz_die(L, "snap_load_fd raised");
  int n = lua_gettop(L) - 1;
  lua_pushinteger(L, n);
  lua_insert(L, 2);
  if (lua_pcall(L, n + 1, 0, 0) != LUA_OK) fuzz_die(L, "fuzz_snapshot");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (L == NULL) {
    for (uint32_t i = 0; i < 256; i++) {
      uint32_t c = i;
      for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82f63b78u & (0u - (c & 1)));
      crc_table[i] = c;
    }
    L = fuzz_lua();
    fuzz_chunk(L, "fuzz_snapshot", CHECK);
  }
  one(data, size);
  if (size >= 96) {
    if (fixed_cap < size) {
      free(fixed);
      fixed = malloc(size);
      if (fixed == NULL) abort();
      fixed_cap = size;
    }
    memcpy(fixed, data, size);
    fix_crcs(fixed, size);
    if (memcmp(fixed, data, size) != 0) one(fixed, size);
  }
  /* a loaded snapshot's memory copies go with it now, not at some GC */
  lua_settop(L, 0);
  lua_gc(L, LUA_GCCOLLECT);
  return 0;
}
