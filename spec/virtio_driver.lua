--- A virtio-mmio driver written in Lua for the specs (virtio_spec,
-- virtio_lua_spec): it negotiates, sets up split virtqueues in guest memory
-- and makes requests through dev:write, the same access the run loop makes
-- for a guest's MMIO write.
local M = {}

--- The registers (virtio 1.2, 4.2.2).
M.R = { MAGIC = 0x000, VERSION = 0x004, DEVICE_ID = 0x008, VENDOR = 0x00c,
        DEV_FEAT = 0x010, DEV_FEAT_SEL = 0x014, DRV_FEAT = 0x020, DRV_FEAT_SEL = 0x024,
        QSEL = 0x030, QNUM_MAX = 0x034, QNUM = 0x038, QREADY = 0x044, NOTIFY = 0x050,
        ISR = 0x060, ACK = 0x064, STATUS = 0x070, DESC = 0x080, DRIVER = 0x090,
        DEVICE = 0x0a0, GEN = 0x0fc, CONFIG = 0x100 }
--- Device status bits and descriptor flags.
M.ACK, M.DRIVER, M.DRIVER_OK, M.FEATURES_OK, M.NEEDS_RESET = 1, 2, 4, 8, 64
M.NEXT, M.WRITE, M.INDIRECT = 1, 2, 4
--- Queue 0's rings in guest memory, buffers from BUF, RAM bytes at 0.
M.DESC, M.AVAIL, M.USED = 0x10000, 0x11000, 0x12000
M.BUF = 0x20000
M.RAM = 1 << 20

--- A disk image of n sectors in a new temporary file (its path added to
-- the list `tmp`, for the spec to remove): sector i filled with the letter
-- 'A' + i % 26.
function M.image(n, tmp)
  local t = {}
  for i = 0, n - 1 do t[#t + 1] = string.char(65 + i % 26):rep(512) end
  return require("support").write_tmp(table.concat(t), tmp)
end

--- A VM with `M.RAM` bytes at 0 and an in-kernel irqchip.
function M.new_vm()
  local kvm = require "kvm"
  local vm = assert(kvm.vm())
  assert(vm:memory{ guest = 0, size = M.RAM })
  assert(vm:irqchip())
  return vm
end

function M.w(dev, reg, v) dev:write(reg, 4, v) end
function M.r(dev, reg) return dev:read(reg, 4) end
local w = M.w

--- Set up queue `qi` with `o.num` entries (default 8) and rings at `o.desc`,
-- `o.avail`, `o.used` (default queue 0's), zeroed, and make it ready.
-- Returns a queue object: q.put(descs, head, avail_idx, first) puts one
-- chain in the rings: descs = {{addr, len, flags, next}, ...} at descriptor
-- `first` on (default 0; next defaults to the following one), head default
-- `first`, the avail index default one more; q.submit(...) also notifies;
-- q.used() reads the used index and its last entry (id, len).
function M.queue(vm, dev, qi, o)
  o = o or {}
  local num = o.num or 8
  local desc, avail, used = o.desc or M.DESC, o.avail or M.AVAIL, o.used or M.USED
  w(dev, M.R.QSEL, qi)
  w(dev, M.R.QNUM, num)
  w(dev, M.R.DESC, desc); w(dev, M.R.DESC + 4, 0)
  w(dev, M.R.DRIVER, avail); w(dev, M.R.DRIVER + 4, 0)
  w(dev, M.R.DEVICE, used); w(dev, M.R.DEVICE + 4, 0)
  -- zeroed where they fit in RAM (a hostile set-up's do not)
  if avail + 6 + 2 * num <= M.RAM then vm:write(avail, ("\0"):rep(6 + 2 * num)) end
  if used + 6 + 8 * num <= M.RAM then vm:write(used, ("\0"):rep(6 + 8 * num)) end
  w(dev, M.R.QREADY, 1)
  local q = { idx = 0, num = num }
  function q.put(descs, head, avail_idx, first)
    first = first or 0
    for i, d in ipairs(descs) do
      local flags = d[3] or 0
      local nxt = d[4] or (flags & M.NEXT ~= 0 and first + i or 0)
      vm:write(desc + 16 * (first + i - 1), string.pack("<I8I4I2I2", d[1], d[2], flags, nxt))
    end
    vm:write(avail + 4 + 2 * (q.idx % num), string.pack("<I2", head or first))
    q.idx = avail_idx or ((q.idx + 1) & 0xffff)
    vm:write(avail + 2, string.pack("<I2", q.idx))
  end
  function q.submit(descs, head, avail_idx, first)
    q.put(descs, head, avail_idx, first)
    w(dev, M.R.NOTIFY, qi)
  end
  function q.used()
    local idx = vm:u16(used + 2)
    local e = (idx - 1) % num
    return idx, vm:u32(used + 4 + 8 * e), vm:u32(used + 8 + 8 * e)
  end
  return q
end

--- A driver: reset, negotiate (VERSION_1 and `o.features`, the high half
-- `o.features_hi`, default 1), set up queue 0 (M.queue's options), DRIVER_OK.
-- Returns queue 0's object.
function M.driver(vm, dev, o)
  o = o or {}
  local R = M.R
  w(dev, R.STATUS, 0)
  w(dev, R.STATUS, M.ACK)
  w(dev, R.STATUS, M.ACK | M.DRIVER)
  w(dev, R.DRV_FEAT_SEL, 1); w(dev, R.DRV_FEAT, o.features_hi or 1)
  w(dev, R.DRV_FEAT_SEL, 0); w(dev, R.DRV_FEAT, o.features or 0)
  w(dev, R.STATUS, M.ACK | M.DRIVER | M.FEATURES_OK)
  local st = M.r(dev, R.STATUS)
  if st ~= M.ACK | M.DRIVER | M.FEATURES_OK then error(("FEATURES_OK refused: status %d"):format(st), 2) end
  local q = M.queue(vm, dev, 0, o)
  w(dev, R.STATUS, M.ACK | M.DRIVER | M.FEATURES_OK | M.DRIVER_OK)
  return q
end

--- A block request on queue q (virtio 1.2, 5.2.6): the header {typ, 0,
-- sector} at BUF, `data_len` bytes of data at BUF + 0x100 (device-writable
-- for `data_dir` "in"; `data` written there first), the status byte at BUF +
-- 0x80 (0xee until the device answers). Returns the status.
function M.blk_req(q, vm, typ, sector, data_len, data_dir, data)
  local BUF = M.BUF
  vm:write(BUF, string.pack("<I4I4I8", typ, 0, sector))
  vm:write(BUF + 0x80, "\xee")
  if data then vm:write(BUF + 0x100, data) end
  local descs = { { BUF, 16, M.NEXT } }
  if data_len then descs[#descs + 1] = { BUF + 0x100, data_len, M.NEXT | (data_dir == "in" and M.WRITE or 0) } end
  descs[#descs + 1] = { BUF + 0x80, 1, M.WRITE }
  q.submit(descs)
  return vm:u8(BUF + 0x80)
end

return M
