-- busted output handler: gtest-style lines per test, then the project's
-- last line, "N passed, N failed" (skipped tests are counted on the lines
-- above: those support.need_kvm skipped for want of KVM apart).
return function(options)
  local busted = require 'busted'
  local handler = require 'busted.outputHandlers.gtest'(options)
  busted.subscribe({ 'suite', 'end' }, function()
    local failed = handler.failuresCount + handler.errorsCount
    local no_kvm, why = 0, nil
    for _, p in ipairs(handler.pendings) do
      -- busted puts "file:line: " in front of a pending's message
      local m = type(p.message) == "string" and p.message:gsub("^[^\n]-:%d+: ", "", 1):match("^no KVM: (.*)")
      if m then no_kvm, why = no_kvm + 1, m end
    end
    io.write(("%d skipped (pending)\n"):format(handler.pendingsCount - no_kvm))
    if no_kvm > 0 then
      io.write(("%d skipped for want of KVM (LUAKVM_ALLOW_NO_KVM=1): %s\n"):format(no_kvm, why))
    end
    io.write(("%d passed, %d failed\n"):format(handler.successesCount, failed))
    io.flush()
    return nil, true
  end)
  return handler
end
