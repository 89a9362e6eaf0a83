--- Helpers for command-line scripts (the examples, the `kvm-boot` command):
-- the option parser they share, sizes like "256M", the default kernel files
-- of a checkout, and a console sink that remembers the guest's last lines.
-- Nothing here prints or exits; the script decides what to do with a message.
--
--     local cli = require "kvm.cli"
--     local o, err = cli.parse(arg, { initrd = "string", mem = "size", status = "flag" })
--     if not o or o.help then usage(err) end
--     print(o[1], o.initrd, o.mem, o.status)   -- KERNEL --initrd FILE --mem 256M --status
-- @module kvm.cli
local cli = {}

local SHIFT = { [""] = 0, k = 10, K = 10, m = 20, M = 20, g = 30, G = 30 }

--- A size in bytes from "4096", "64K", "256M" or "1G".
-- @tparam string s
-- @tparam[opt=""] string unit what a bare number counts: "" bytes, "K", "M" or "G"
-- @treturn ?integer bytes, or nil when `s` is not such a size
function cli.size(s, unit)
  local n, suffix = tostring(s):match("^(%d+)([KkMmGg]?)$")
  if not n then return nil end
  return math.tointeger(n) << SHIFT[suffix ~= "" and suffix or unit or ""]
end

--- A disk from "FILE" or "FILE,ro" (`--disk`): `{path =, readonly =}`.
-- @tparam string s
-- @treturn ?table nil for an empty path or an unknown suffix after the comma
function cli.disk(s)
  local path, flag = tostring(s):match("^(.-),(%w+)$")
  if not path then path = tostring(s) end
  if path == "" or (flag and flag ~= "ro" and flag ~= "rw") then return nil end
  return { path = path, readonly = flag == "ro" }
end

-- option kinds: the value from the argument that follows, or nil
local KINDS = {
  string = function(v) return v end,
  number = tonumber,
  size = cli.size,
  mib = function(v) return cli.size(v, "M") end,
  disks = cli.disk,
}
local WANT = { number = "a number expected", size = "a size like 256M expected",
               mib = "a size like 256M expected", disks = "FILE or FILE,ro expected" }

--- Parse a script's arguments: `--name VALUE` for the named options,
-- `--name` for flags, `-h`/`--help`, and positional arguments.
-- @tparam table args the script's `arg`
-- @tparam table options `{name = kind}`: kind "string", "number", "size" (`cli.size`),
--   "mib" (a size where a bare number counts MiB, as QEMU's -m: "256" is 256M),
--   "disks" (repeatable `FILE[,ro]`: a list of `cli.disk`'s tables), "pair" (two
--   values: `{first, second}`) or "flag"
-- @tparam[opt=1] integer max_args how many positional arguments are allowed
-- @treturn table `{name = value, ..., help = true (for -h or --help), [1] = the first positional, ...}`
-- @return[2] nil, message: "--mem needs a value", "--mem: a size like 256M expected",
--   "unknown option --bogus", "one argument only (got extra)"
function cli.parse(args, options, max_args)
  max_args = max_args or 1
  local out = {}
  local i = 1
  while i <= #args do
    local a = args[i]
    local name = a:match("^%-%-(.+)$")
    local kind = name and options[name]
    if a == "-h" or a == "--help" then
      out.help = true
    elseif kind == "flag" then
      out[name] = true
    elseif kind == "pair" then
      if args[i + 1] == nil or args[i + 2] == nil then return nil, a .. " needs two values" end
      out[name] = { args[i + 1], args[i + 2] }
      i = i + 2
    elseif kind then
      i = i + 1
      if args[i] == nil then return nil, a .. " needs a value" end
      local v = KINDS[kind](args[i])
      if v == nil then return nil, a .. ": " .. WANT[kind] end
      if kind == "disks" then             -- repeatable: a list in the order given
        out[name] = out[name] or {}
        table.insert(out[name], v)
      else
        out[name] = v
      end
    elseif a:sub(1, 1) == "-" then
      return nil, "unknown option " .. a
    elseif #out < max_args then
      out[#out + 1] = a
    else
      return nil, (max_args == 1 and "one argument only" or max_args .. " arguments at most") ..
        " (got " .. a .. ")"
    end
    i = i + 1
  end
  return out
end

--- Does a file exist (can it be opened for reading)?
-- @tparam string path
-- @treturn boolean
function cli.exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

--- The files `make kernel` fetches into a checkout's guest-kernel/.
-- @tparam string root the checkout (".": the current directory)
-- @treturn table `{vmlinux =, bzimage =, initrd =}` paths, present or not
function cli.guest_kernel(root)
  local dir = root .. "/guest-kernel/"
  return { vmlinux = dir .. "vmlinux", bzimage = dir .. "bzImage", initrd = dir .. "initramfs.cpio.gz" }
end

--- A console sink for `vm:serial{output = ...}` (kvm.linux's `output`): it
-- writes the guest's bytes to `echo` when given and keeps its last lines.
-- @tparam[opt] table o `echo` (a FILE: written and flushed), `keep` (how
--   many non-empty lines to keep, default 10)
-- @treturn table `{output = function(bytes), lines = {...}, last = the last
--   non-empty line ("" before one)}`
function cli.console(o)
  o = o or {}
  local keep = o.keep or 10
  local c = { lines = {}, last = "" }
  local partial = ""
  function c.output(bytes)
    if o.echo then o.echo:write(bytes) o.echo:flush() end
    partial = partial .. bytes
    for line in partial:gmatch("([^\r\n]*)\r?\n") do
      if line ~= "" then
        c.last = line
        c.lines[#c.lines + 1] = line
        if #c.lines > keep then table.remove(c.lines, 1) end
      end
    end
    partial = partial:match("([^\n]*)$"):sub(-4096)
  end
  return c
end

return cli
