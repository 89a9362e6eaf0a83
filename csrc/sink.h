/*
** sink.h - where a device's output goes (a UART's transmitter, the debug
** console): bytes buffered in C and handed to a Lua FILE or function at a
** newline, when the buffer is full, on the tick and when run() returns.
*/
#ifndef LUAKVM_SINK_H
#define LUAKVM_SINK_H

#include "luakvm.h"

#define SINK_BUF 4096
enum { SINK_NONE = 0, SINK_FILE, SINK_FUNC };

typedef struct Sink {
  char buf[SINK_BUF];
  size_t len;
  int kind;                      /* SINK_* */
  int ref;                       /* the FILE or function in the VM's table */
  int want;                      /* a newline or a full buffer: flush now */
  uint64_t bytes, dropped;
} Sink;

/* Set k from the option `field` of the table at opts: a FILE (default
   io.stdout), a function(bytes), or false to discard; kept alive in the VM's
   table (the VM at stack index 1). Raises "who: ..." on a bad value. */
void sink_open(lua_State *L, Sink *k, int opts, const char *field, const char *who);
/* the FILE at idx; NULL when it is not one; raises when it is closed */
luaL_Stream *sink_checkfile(lua_State *L, int idx, const char *who, const char *field);

static inline void sink_put(Sink *k, uint8_t v) {
  k->bytes++;
  if (k->kind == SINK_NONE) return;
  if (k->len >= SINK_BUF) { k->dropped++; k->want = 1; return; }
  k->buf[k->len++] = (char)v;
  if (v == '\n' || k->len == SINK_BUF) k->want = 1;
}

/* hand the buffer out: BUS_OK, or BUS_ERROR with the message on top */
int sink_flush(Sink *k, BusCall *bc);

#endif
