--- snaplinux.lua: rows 9c-9e of `make bench`, a booted Linux saved to a file
-- and restored from it, in this process (kvm.linux: linux.save, linux.restore).
--
-- The boot: `make kernel`'s vmlinux and busybox initramfs, 128 MiB, one vCPU,
-- run until the shell's prompt ("/ # ") arrives on the console. Then, SAVES
-- times: vm:snapshot() alone, timed, then linux.save(ctx, file) (vm:snapshot()
-- and snap:save(file): the file written through FILE.tmp, fsync'd, renamed),
-- timed, and the file's size.
-- The booted VM is closed; then, SAVES times: kvm.load_snapshot(file) alone,
-- timed and dropped, `bench/floor memcpy file` (the file mapped and copied
-- into anonymous memory: the floor for reading it in), then
-- linux.restore(file) (the file
-- read and checked, the machine built as for a boot but for what the snapshot
-- brings, vm:restore), timed; the restored shell is typed at through a FIFO
-- ("echo restored-$((6*7))") and must answer "restored-42" (not timed), and
-- that VM is closed.
--
-- Used by bench/bench.lua (`dofile "bench/snaplinux.lua"`); needs a KVM that
-- runs a guest's user mode (kvm_pvm does not: `make bench` runs nested there).
local kvm = require "kvm"
local linux = require "kvm.linux"

local M = {}

M.VMLINUX = os.getenv("VMLINUX") or "guest-kernel/vmlinux"
M.INITRD = os.getenv("INITRD") or "guest-kernel/initramfs.cpio.gz"
M.MEMORY = 128 << 20
M.PROMPT = "/ # "
M.TIMEOUT = tonumber(os.getenv("BOOT_TIMEOUT") or "300")

local function close(ctx)
  for _, c in ipairs(ctx.cpus or { ctx.cpu }) do c:close() end
  ctx.vm:close()
end

-- a console output function that stops the run at the first `text` after
-- it is armed, and the state it keeps
local function watcher(get_ctx)
  local w = { seen = "", text = nil, all = {} }
  function w.output(bytes)
    w.all[#w.all + 1] = bytes
    if not w.text then return end
    w.seen = (w.seen .. bytes):sub(-(#w.text + 4096))
    if w.seen:find(w.text, 1, true) then
      w.text, w.seen = nil, ""
      get_ctx().cpu:stop()
    end
  end
  function w.arm(text) w.text, w.seen = text, "" end
  function w.tail() return table.concat(w.all):sub(-200) end
  return w
end

-- run ctx until the watcher's text (the run returns "stopped"), or fail
local function run_until(ctx, w, text, timeout)
  w.arm(text)
  local e = linux.run(ctx, { timeout = timeout })
  if e.reason ~= "stopped" then
    error(("did not see %q: the run ended with %s; the console's last bytes: %q"):format(text, tostring(e),
      w.tail()), 0)
  end
end

--- Boot, save SAVES times, restore SAVES times. Returns { save = {ms...},
-- restore = {ms...}, snapshot = {ms...} (vm:snapshot() alone, before each
-- save), load = {ms...} (kvm.load_snapshot(file) alone, before each
-- restore), memcpy = {ms...} (`bench/floor memcpy file`, after each load),
-- size = bytes, boot = seconds }, or raises.
function M.measure(saves, progress)
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p " .. dir .. " && mkfifo " .. dir .. "/in"))
  local file, fifo = dir .. "/linux.snap", dir .. "/in"
  -- the FIFO opened read-write: neither open waits for the other end
  local input = assert(io.open(fifo, "r+b"))
  local typist = assert(io.open(fifo, "wb"))
  typist:setvbuf("no")
  local res = { save = {}, restore = {}, snapshot = {}, load = {}, memcpy = {} }
  local ok, err = pcall(function()
    local ctx
    local w = watcher(function() return ctx end)
    progress("9c: booting Linux to its shell")
    local t0 = kvm.now()
    ctx = assert(linux.setup{ kernel = M.VMLINUX, initrd = M.INITRD, memory = M.MEMORY, output = w.output,
                              input = input })
    run_until(ctx, w, M.PROMPT, M.TIMEOUT)
    res.boot = kvm.now() - t0
    for i = 1, saves do
      progress(("9c: save %d/%d"):format(i, saves))
      local t0s = kvm.now()
      assert(ctx.vm:snapshot())     -- alone: the part of a save that is not the file
      res.snapshot[i] = (kvm.now() - t0s) * 1e3
      local t1 = kvm.now()
      local snap, serr = linux.save(ctx, file)
      res.save[i] = (kvm.now() - t1) * 1e3
      assert(snap, serr)
    end
    local f = assert(io.open(file, "rb"))
    res.size = f:seek("end")
    f:close()
    close(ctx)
    for i = 1, saves do
      progress(("9d: restore %d/%d"):format(i, saves))
      local ctx2
      local w2 = watcher(function() return ctx2 end)
      local t0l = kvm.now()
      assert(kvm.load_snapshot(file))   -- alone: the file's part of a restore
      res.load[i] = (kvm.now() - t0l) * 1e3
      -- the floor for reading it in: bench/floor maps the file and copies all of it
      local p = assert(io.popen("bench/floor memcpy " .. file))
      local secs = tonumber(p:read("a"):match("memcpy %d+ ([%d.]+)"))
      p:close()
      res.memcpy[i] = assert(secs, "bench/floor memcpy failed") * 1e3
      collectgarbage()
      local t1 = kvm.now()
      local rerr
      ctx2, rerr = linux.restore(file, { output = w2.output, input = input })
      res.restore[i] = (kvm.now() - t1) * 1e3
      assert(ctx2, rerr)
      typist:write("echo restored-$((6*7))\n")
      run_until(ctx2, w2, "restored-42", 60)
      close(ctx2)
    end
  end)
  input:close()
  typist:close()
  os.execute("rm -rf " .. dir)
  if not ok then error(err, 0) end
  return res
end

return M
