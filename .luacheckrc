-- luacheck configuration (`make lint`): Lua 5.4 everywhere.
std = "lua54"
max_line_length = 120
codes = true

-- the specs run under busted (spec/run.lua), which provides describe/it/assert...
files["spec/"] = {
  std = "+busted",
  -- Deliberate in specs: a local that only keeps an object alive (the VM
  -- behind a vCPU, a memory region), `x = nil` to drop a reference before a
  -- GC test, handlers written with their full (port, dir, size, value)
  -- signature.
  ignore = { "211/vm%d*", "211/cpu", "211/ram", "311", "212" },
  -- data-driven cases carry exact error messages on one line
  max_line_length = 140,
}
-- spec/run.lua sets the global `arg` busted's runner reads
files["spec/run.lua"] = { globals = { "arg" } }

exclude_files = { "doc/", ".luarocks/", "lua_modules/" }
