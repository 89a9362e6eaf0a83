-- busted output handler: gtest-style lines per test, then the project's
-- last line, "N passed, N failed" (skipped tests are counted on the line above).
return function(options)
  local busted = require 'busted'
  local handler = require 'busted.outputHandlers.gtest'(options)
  busted.subscribe({ 'suite', 'end' }, function()
    local failed = handler.failuresCount + handler.errorsCount
    io.write(("%d skipped (pending)\n"):format(handler.pendingsCount))
    io.write(("%d passed, %d failed\n"):format(handler.successesCount, failed))
    io.flush()
    return nil, true
  end)
  return handler
end
