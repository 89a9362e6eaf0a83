#!/usr/bin/env lua5.4
--- cow_disk.lua: boot Linux with a copy-on-write disk written in Lua.
--
-- Usage: lua5.4 examples/cow_disk.lua KERNEL --base IMAGE [--initrd FILE]
--          [--trace FILE] [--save FILE] [--mem 256] [--timeout SECONDS]
--
-- The guest's /dev/vda is a virtio block device (virtio 1.2, 5.2) written in
-- Lua on vm:virtio: reads fall through to IMAGE, opened read-only; writes go
-- to a Lua table of 512-byte sectors and vanish when the VM does (--save
-- FILE keeps IMAGE plus them in FILE). Every request is traced: --trace FILE
-- gets one line each ("R sector count", "W sector count", "F" for a flush,
-- "I" for GET_ID), and a summary goes to stderr at the end. The console is
-- this terminal, as with boot_linux.lua; with the test initramfs (`make
-- kernel`) type `mount /dev/vda /mnt` at its shell.
--
-- Loaded rather than run (`dofile("examples/cow_disk.lua")`), it returns the
-- device: `cow.new(image, {trace = function(op, sector, count)})` gives
-- `{options = vm:virtio's options, overlay = {[sector] = bytes}, ...}`.
--
-- Expected output (Debian's cloud kernel and the test initramfs, nested on
-- kvm_amd; an 8 MiB ext4 IMAGE; typed: `mount -t ext4 /dev/vda /mnt; cat
-- /mnt/marker.txt; echo hi > /mnt/x; sync; poweroff`):
--   [   11.317979] virtio_blk virtio0: [vda] 16384 512-byte logical blocks (8.39 MB/8.00 MiB)
--   ...
--   [   12.385388] EXT4-fs (vda): mounted filesystem with ordered data mode. Quota mode: none.
--   marker-from-the-host
--   ...
--   cow_disk: the run ended: poweroff
--   cow_disk: the guest read 26 sectors from base.img, wrote 40 (40 kept in the table), 7 flushes, 0 requests refused
--   cow_disk: base.img is as it was: it was opened read-only
-- and the trace begins "R 0 8", "R 2 2", "R 4 2", "R 196 2" (29 lines).
local script = arg and arg[0] or ""
local root = script:match("^(.*)/examples/[^/]*$") or (script:match("^examples/[^/]*$") and ".")
if root then
  package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
  package.cpath = root .. "/?.so;" .. package.cpath
end

local cow = {}

local SECTOR = 512
-- request types and statuses (virtio 1.2, 5.2.6)
local T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
local S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
-- features: VIRTIO_BLK_F_SEG_MAX (the config's seg_max), VIRTIO_BLK_F_FLUSH
local F_SEG_MAX, F_FLUSH = 1 << 2, 1 << 9
local SEG_MAX = 126

--- A copy-on-write disk over the image at `base` (opened read-only; whole
-- sectors: a tail shorter than 512 bytes is not part of it).
-- @tparam string base the image's path
-- @tparam[opt] table o `trace` (function(op, sector, count) for every request:
--   op "R", "W", "F" or "I"), `serial` (GET_ID's answer, at most 20 bytes,
--   default "luakvm-cow")
-- @return the disk: `{options = vm:virtio's options (or an entry of
--   kvm.linux's `virtio` list), overlay = {[sector] = 512 bytes}, sectors =,
--   read = {[sector] = true}, written = {[sector] = true}, counts = {reads=,
--   writes=, flushes=, ids=, errors=, bad=}, save = function(path), close = function()}`
-- @return[2] nil, message (the image does not open)
function cow.new(base, o)
  o = o or {}
  local f, err = io.open(base, "rb")
  if not f then return nil, err end
  local size = f:seek("end")
  local d = { overlay = {}, sectors = size // SECTOR, read = {}, written = {},
              counts = { reads = 0, writes = 0, flushes = 0, ids = 0, errors = 0, bad = 0 } }
  local trace = o.trace or function() end
  local serial = (o.serial or "luakvm-cow"):sub(1, 20)

  local function fits(sector, count)
    return sector >= 0 and count <= d.sectors and sector <= d.sectors - count
  end

  -- count sectors from `sector` on: the table's where the guest wrote, the
  -- image's elsewhere (a run of them in one read)
  local function read(sector, count)
    local out, i = {}, 0
    while i < count do
      local s = sector + i
      if d.overlay[s] then
        out[#out + 1] = d.overlay[s]
        i = i + 1
      else
        local n = 1
        while i + n < count and not d.overlay[s + n] do n = n + 1 end
        f:seek("set", s * SECTOR)
        out[#out + 1] = f:read(n * SECTOR)
        i = i + n
      end
    end
    for k = sector, sector + count - 1 do d.read[k] = true end
    return table.concat(out)
  end

  local function write(sector, data)
    for i = 0, #data // SECTOR - 1 do
      d.overlay[sector + i] = data:sub(i * SECTOR + 1, (i + 1) * SECTOR)
      d.written[sector + i] = true
    end
  end

  -- one request: a 16-byte header {type, reserved, sector} in the readable
  -- part, the data (OUT: readable; IN, GET_ID: writable), a status byte last
  local function request(c)
    if c.readable < 16 or c.writable < 1 then        -- no header or no status byte: nothing to answer
      d.counts.bad = d.counts.bad + 1
      c:done(0)
      return
    end
    local typ, _, sector = string.unpack("<I4I4i8", c:read(0, 16))
    local st = S_OK
    if typ == T_IN or typ == T_OUT then
      local len = typ == T_IN and c.writable - 1 or c.readable - 16
      local count = len // SECTOR
      if len % SECTOR ~= 0 or not fits(sector, count) then
        st = S_IOERR
        d.counts.errors = d.counts.errors + 1
      elseif typ == T_IN then
        trace("R", sector, count)
        d.counts.reads = d.counts.reads + 1
        c:write(0, read(sector, count))
      else
        trace("W", sector, count)
        d.counts.writes = d.counts.writes + 1
        write(sector, c:read(16, len))
      end
    elseif typ == T_FLUSH then
      trace("F", 0, 0)                                 -- nothing to make durable: it all vanishes
      d.counts.flushes = d.counts.flushes + 1
    elseif typ == T_GET_ID then
      trace("I", 0, 0)
      d.counts.ids = d.counts.ids + 1
      c:write(0, (serial .. ("\0"):rep(20)):sub(1, math.min(20, c.writable - 1)))
    else
      st = S_UNSUPP
    end
    c:write(c.writable - 1, string.char(st))
    c:done()                                           -- written: up to the status byte
  end

  -- struct virtio_blk_config: capacity (le64), size_max (le32), seg_max (le32)
  d.options = {
    type = "block",
    features = F_SEG_MAX | F_FLUSH,
    config = string.pack("<I8I4I4", d.sectors, 0, SEG_MAX),
    on_queue = function(q)
      for c in q:chains() do request(c) end
    end,
  }

  --- The image with the guest's writes, into a new file at `path`.
  function d.save(path)
    local out, oerr = io.open(path, "wb")
    if not out then return nil, oerr end
    f:seek("set", 0)
    for s = 0, d.sectors - 1 do
      out:write(d.overlay[s] or f:read(SECTOR))
      if d.overlay[s] then f:seek("cur", SECTOR) end
    end
    out:close()
    return true
  end

  function d.close() f:close() end
  return d
end

-- loaded (by a spec), not run: the device only
if not script:match("cow_disk%.lua$") then return cow end

local linux = require "kvm.linux"
local cli = require "kvm.cli"

local me = "cow_disk"
local args, bad = cli.parse(arg, { base = "string", initrd = "string", trace = "string", save = "string",
                                   mem = "mib", timeout = "number" })
local function usage(msg)
  io.stderr:write(me, ": ", msg, "\nusage: lua5.4 examples/cow_disk.lua KERNEL --base IMAGE [--initrd FILE]",
                  " [--trace FILE] [--save FILE] [--mem 256] [--timeout SECONDS]\n")
  os.exit(2)
end
if not args then usage(bad) end
if args.help then usage("boot Linux with IMAGE as /dev/vda, copy-on-write in a Lua table") end
if not args[1] then usage("no kernel given") end
if not args.base then usage("no --base IMAGE given") end

local tracef
if args.trace then
  tracef = assert(io.open(args.trace, "w"))
end
local disk, err = cow.new(args.base, { trace = tracef and function(op, sector, count)
  tracef:write(op, (op == "R" or op == "W") and (" " .. sector .. " " .. count) or "", "\n")
end })
if not disk then
  io.stderr:write(me, ": ", err, "\n")
  os.exit(1)
end

local console = cli.console{ echo = io.stdout }
local e, ctx = linux.boot{ kernel = args[1], initrd = args.initrd, memory = args.mem, timeout = args.timeout,
                           output = console.output, input = io.stdin, virtio = { disk.options } }
if not e then
  io.stderr:write(me, ": ", ctx, "\n")
  os.exit(1)
end
ctx.vm:close()
if tracef then tracef:close() end

local function count(set)
  local n = 0
  for _ in pairs(set) do n = n + 1 end
  return n
end
local c = disk.counts
io.stderr:write(("\n%s: the run ended: %s\n"):format(me, e.reason))
io.stderr:write(("%s: the guest read %d sectors from %s, wrote %d (%d kept in the table), %d flushes, " ..
                 "%d requests refused\n"):format(me, count(disk.read), args.base, count(disk.written),
                 count(disk.overlay), c.flushes, c.errors + c.bad))
if args.save then
  local ok, serr = disk.save(args.save)
  io.stderr:write(me, ": ", ok and ("the image with the guest's writes is in " .. args.save) or serr, "\n")
end
io.stderr:write(me, ": ", args.base, " is as it was: it was opened read-only\n")
disk.close()
os.exit(e.reason == "poweroff" and 0 or 1)
