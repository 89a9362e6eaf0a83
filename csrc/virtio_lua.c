/*
** virtio_lua.c - a virtio device written in Lua (vm:virtio): the virtio-mmio
** transport of virtio.c with the script's device id, features, config space
** and queues, and a Lua function, on_queue(q), that takes the descriptor
** chains of a queue the driver notified and hands them back used.
**
** A chain reaches Lua as a view (kvm.virtio.chain): reads of its readable
** part and writes into its writable part by offset, bounds-checked here; no
** guest address is ever given out. Each access looks the chain's buffers up
** in guest memory again, so a view never points at memory that went away. A
** view, and the queue object on_queue gets, are valid only while that call
** runs; a view also ends at chain:done. A chain taken but not done is held
** and taken again first at the queue's next call (dev:process calls on_queue
** when the script has something for held chains: a console's input). The
** used interrupt is raised once when a call that used chains returns.
**
** The device is a Lua device on the bus (DeviceOps.lua): every access to its
** registers runs on the thread that owns the Lua state (bus_lua), one at a
** time, so its state needs no lock. What the driver writes is checked by
** virtio.c's chain walker; in addition a driver cannot have more chains in
** flight than its queue holds (held ones included), which bounds what a
** queue keeps here. A handler's error ends run() with it, as a port
** handler's does.
*/

/*** vm:virtio, below, is a method of kvm.vm.
@classmod kvm.vm
*/
#include <string.h>

#include "virtio.h"

#define QUEUE_MT "kvm.virtio.queue"
#define CHAIN_MT "kvm.virtio.chain"

/* transport feature bits (24-49): VERSION_1 is the only one offered */
#define TRANSPORT_FEATURES  (((1ull << 50) - 1) & ~((1ull << 24) - 1))

/* a chain taken during the queue's current call */
typedef struct Live {
  uint16_t head;
  uint8_t on;                    /* taken, not done */
  uint32_t gen;                  /* the device's resets when taken */
} Live;

typedef struct LuaQueue {
  uint16_t held[VIRTIO_QUEUE_MAX];   /* taken, not done when their call returned */
  int nheld;
  Live live[VIRTIO_QUEUE_MAX];       /* this call's chains (slots of done ones reused) */
  int nlive;
  uint16_t freel[VIRTIO_QUEUE_MAX];
  int nfree;
  int inflight;                  /* taken from the avail ring and not used: at most QueueNum */
  int busy;                      /* on_queue runs for it ... */
  uint64_t seq;                  /* ... as call number seq */
  int ref;                       /* its kvm.virtio.queue in the VM's table */
} LuaQueue;

typedef struct VLua {
  Virtio v;                      /* first: a VLua is a Virtio */
  VirtioType type;               /* its own: the id and the queues are the script's */
  int fn;                        /* on_queue in the VM's table */
  uint32_t pending;              /* queues notified, on_queue not yet called */
  uint32_t gen;                  /* resets so far */
  uint64_t seq;                  /* calls so far */
  int used;                      /* a chain was used since the last interrupt */
  LuaQueue lq[VIRTIO_MAX_QUEUES];
  uint64_t calls, used_chains, held_chains;
} VLua;

/* the queue object on_queue gets: its uservalue pins the device */
typedef struct QueueView {
  VLua *d;
  int q;
} QueueView;

/* a chain's view: valid while call `seq` of queue q runs and it is not done;
   its uservalue pins the device */
typedef struct Chain {
  VLua *d;
  uint64_t seq;
  int q, slot, done;
  uint16_t head;
  uint64_t rlen, wlen;
  uint64_t high;                 /* the end of the furthest write */
  int n;
  VirtioSeg seg[];
} Chain;

static void vlua_notify(Virtio *v, int q) {
  ((VLua *)v)->pending |= 1u << q;
}

static void vlua_reset(Virtio *v) {
  VLua *d = (VLua *)v;
  d->gen++;                      /* chains of the calls running now are dropped */
  d->pending = 0;
  for (int i = 0; i < VIRTIO_MAX_QUEUES; i++) {
    d->lq[i].nheld = 0;
    d->lq[i].inflight = 0;
  }
}

static void vlua_stats(Virtio *v, lua_State *L) {
  VLua *d = (VLua *)v;
  kvm_add_count(L, "virtio_lua_calls", d->calls);
  kvm_add_count(L, "virtio_lua_used", d->used_chains);
  kvm_add_count(L, "virtio_lua_held", d->held_chains);
}

/* ---- a call of on_queue ---- */

/* the call of queue q is over: its views end (by seq), chains not done are
   held, first in the order taken, then those held before */
static void end_call(VLua *d, int q) {
  LuaQueue *lq = &d->lq[q];
  uint16_t back[VIRTIO_QUEUE_MAX];
  int n = 0;
  for (int i = 0; i < lq->nlive; i++)
    if (lq->live[i].on && lq->live[i].gen == d->gen) back[n++] = lq->live[i].head;
  if (n + lq->nheld > VIRTIO_QUEUE_MAX) n = VIRTIO_QUEUE_MAX - lq->nheld;   /* cannot: inflight bounds both */
  if (n > 0) {
    memmove(lq->held + n, lq->held, (size_t)lq->nheld * sizeof lq->held[0]);
    memcpy(lq->held, back, (size_t)n * sizeof back[0]);
    lq->nheld += n;
  }
  d->held_chains += (uint64_t)n;
  lq->nlive = 0;
  lq->nfree = 0;
  lq->busy = 0;
  if (d->used) {
    d->used = 0;
    virtio_interrupt(&d->v, VIRTIO_ISR_USED);
  }
}

static int call(VLua *d, BusCall *bc, int q) {
  lua_State *L = bc->L;
  LuaQueue *lq = &d->lq[q];
  Vm *vm = d->v.dev.vm;
  luaL_checkstack(L, 4, "vm:virtio");
  lua_rawgeti(L, bc->tab, d->fn);
  lua_rawgeti(L, bc->tab, lq->ref);
  lq->busy = 1;
  lq->seq = ++d->seq;
  d->calls++;
  vm->in_handler++;              /* it may not run a vCPU */
  int s = lua_pcall(L, 1, 0, bc->msgh);
  vm->in_handler--;
  end_call(d, q);
  return s == LUA_OK ? BUS_OK : BUS_ERROR;
}

/* on_queue for each queue notified (a queue whose call runs: when it returns) */
static int serve(VLua *d, BusCall *bc) {
  for (;;) {
    int q = -1;
    for (int i = 0; i < d->type.nqueues && q < 0; i++)
      if ((d->pending & (1u << i)) && !d->lq[i].busy) q = i;
    if (q < 0 || d->v.dev.closed) return BUS_OK;
    d->pending &= ~(1u << q);
    int st = call(d, bc, q);
    if (st != BUS_OK) return st;
  }
}

static int vlua_access(Device *dev, BusCall *bc, uint64_t addr, int is_write, unsigned size,
                       uint8_t *data) {
  VLua *d = (VLua *)dev;
  virtio_access(dev, bc, addr, is_write, size, data);
  return d->pending ? serve(d, bc) : BUS_OK;
}

/* a BusCall of the Lua thread for a method of the device at index 1 (no
   vCPU): the VM's table pushed; errors are raised with no traceback added */
static void method_call(lua_State *L, BusCall *bc) {
  lua_getiuservalue(L, 1, 1);              /* the VM */
  lua_getiuservalue(L, -1, 1);             /* its table */
  lua_pushliteral(L, "in");
  lua_pushliteral(L, "out");
  memset(bc, 0, sizeof *bc);
  bc->L = L;
  bc->tab = lua_gettop(L) - 2;
  bc->strs = bc->tab + 1;
}

void virtio_lua_write(lua_State *L, Virtio *v, uint64_t off, unsigned size, uint8_t *data) {
  BusCall bc;
  method_call(L, &bc);
  if (v->dev.ops->access(&v->dev, &bc, v->base + off, 1, size, data) == BUS_ERROR) lua_error(L);
}

/* ---- kvm.virtio.queue ---- */

/*** The queue object a Lua device's on_queue gets (vm:virtio): valid during
that call only. Fields: `index` (from 0), `num` (the driver's QueueNum),
`driver_features` (the feature bits the driver accepted), `device` (the
kvm.virtio).
@type kvm.virtio.queue
*/

static QueueView *checkqueue(lua_State *L) {
  QueueView *qv = luaL_checkudata(L, 1, QUEUE_MT);
  if (!qv->d->lq[qv->q].busy)
    luaL_error(L, "kvm.virtio.queue: used outside its on_queue call (a queue object is valid during the call only)");
  if (qv->d->v.dev.closed) luaL_error(L, "attempt to use a closed kvm.virtio");
  return qv;
}

/* the next chain of queue q: a held one first, else one from the avail
   ring; its head in *head, its buffers in d->v.seg. 1, or 0: none */
static int next_chain(VLua *d, int q, uint16_t *head, VirtioChain *c) {
  Virtio *v = &d->v;
  LuaQueue *lq = &d->lq[q];
  if (!v->q[q].ready || (v->status & VIRTIO_S_NEEDS_RESET)) return 0;
  if (lq->nheld > 0) {
    *head = lq->held[0];
    lq->nheld--;
    memmove(lq->held, lq->held + 1, (size_t)lq->nheld * sizeof lq->held[0]);
  } else {
    if (virtio_queue_take(v, q, head) <= 0) return 0;
    if (lq->inflight >= (int)v->q[q].num) {
      virtio_fail(v, "more chains in flight than the queue holds");
      return 0;
    }
    lq->inflight++;
  }
  if (virtio_chain_walk(v, q, *head, c) < 0) return 0;
  return 1;
}

/*** The next descriptor chain of the queue, or nil when none waits: first
the chains left not done by earlier calls, then the driver's new ones.
@function queue:pop
@treturn ?kvm.virtio.chain a view of it, valid until chain:done or the end
  of this on_queue call
@raise outside the on_queue call that got the queue
*/
static int l_queue_pop(lua_State *L) {
  QueueView *qv = checkqueue(L);
  VLua *d = qv->d;
  LuaQueue *lq = &d->lq[qv->q];
  uint16_t head = 0;
  VirtioChain c;
  if (!next_chain(d, qv->q, &head, &c)) { lua_pushnil(L); return 1; }
  int slot;
  if (lq->nfree > 0) slot = lq->freel[--lq->nfree];
  else if (lq->nlive < VIRTIO_QUEUE_MAX) slot = lq->nlive++;
  else {                         /* cannot: a queue's chains in flight are at most QueueNum */
    virtio_fail(&d->v, "more chains in flight than the queue holds");
    lua_pushnil(L);
    return 1;
  }
  /* recorded before the view is made: a memory error leaves it held */
  lq->live[slot].head = head;
  lq->live[slot].on = 1;
  lq->live[slot].gen = d->gen;
  Chain *ch = lua_newuserdatauv(L, sizeof(Chain) + (size_t)c.n * sizeof(VirtioSeg), 1);
  ch->d = d;
  ch->seq = lq->seq;
  ch->q = qv->q;
  ch->slot = slot;
  ch->done = 0;
  ch->head = head;
  ch->rlen = c.rlen;
  ch->wlen = c.wlen;
  ch->high = 0;
  ch->n = c.n;
  memcpy(ch->seg, c.seg, (size_t)c.n * sizeof(VirtioSeg));
  lua_getiuservalue(L, 1, 1);
  lua_setiuservalue(L, -2, 1);
  luaL_setmetatable(L, CHAIN_MT);
  return 1;
}

/*** An iterator over the queue's chains (pop until nil):
`for chain in q:chains() do ... end`.
@function queue:chains
@treturn function
*/
static int l_queue_chains(lua_State *L) {
  checkqueue(L);
  lua_pushcfunction(L, l_queue_pop);
  lua_pushvalue(L, 1);
  return 2;
}

/* __index of the views: the number of the field key 2 names in `names`, or
   -1 with key 2's method (or nil) pushed */
static int field_or_method(lua_State *L, const char *const *names) {
  const char *k = lua_type(L, 2) == LUA_TSTRING ? lua_tostring(L, 2) : NULL;
  for (int i = 0; k && names[i]; i++)
    if (strcmp(k, names[i]) == 0) return i;
  lua_getmetatable(L, 1);
  lua_getfield(L, -1, "methods");
  lua_pushvalue(L, 2);
  lua_rawget(L, -2);
  return -1;
}

/* fields: index (from 0), num (QueueNum), driver_features, device */
static int l_queue_index(lua_State *L) {
  static const char *const names[] = {"index", "num", "driver_features", "device", NULL};
  QueueView *qv = luaL_checkudata(L, 1, QUEUE_MT);
  Virtio *v = &qv->d->v;
  switch (field_or_method(L, names)) {
  case 0: lua_pushinteger(L, qv->q); break;
  case 1: lua_pushinteger(L, v->q[qv->q].num); break;
  case 2: lua_pushinteger(L, (lua_Integer)v->driver_features); break;
  case 3: lua_getiuservalue(L, 1, 1); break;
  default: break;
  }
  return 1;
}

static int l_queue_tostring(lua_State *L) {
  QueueView *qv = luaL_checkudata(L, 1, QUEUE_MT);
  lua_pushfstring(L, "kvm.virtio.queue %d%s", qv->q, qv->d->lq[qv->q].busy ? "" : " (outside its call)");
  return 1;
}

/* ---- kvm.virtio.chain ---- */

/*** A descriptor chain of a Lua device (vm:virtio) as a view: valid during
the on_queue call that popped it, until chain:done. Fields: `readable` and
`writable` (the bytes of each part), `head` (its first descriptor's index),
`queue` (from 0).
@type kvm.virtio.chain
*/

static Chain *checkchain(lua_State *L) {
  Chain *ch = luaL_checkudata(L, 1, CHAIN_MT);
  if (ch->done) luaL_error(L, "kvm.virtio.chain: used after chain:done (its buffers are the driver's again)");
  LuaQueue *lq = &ch->d->lq[ch->q];
  if (!lq->busy || lq->seq != ch->seq)
    luaL_error(L, "kvm.virtio.chain: used after its on_queue call returned (a chain is a view for the call only)");
  if (ch->d->v.dev.closed) luaL_error(L, "attempt to use a closed kvm.virtio");
  return ch;
}

/* the chain's buffers in guest memory now, as a VirtioChain (writing: the
   writable ones marked for a snapshot restore) */
static void buffers(lua_State *L, Chain *ch, VirtioChain *c, int writing) {
  Vm *vm = ch->d->v.dev.vm;
  for (int i = 0; i < ch->n; i++) {
    VirtioSeg *s = &ch->seg[i];
    s->p = writing && s->write ? kvm_gpa_wptr(vm, s->gpa, s->len) : kvm_gpa_ptr(vm, s->gpa, s->len);
    if (s->p == NULL) luaL_error(L, "kvm.virtio.chain: a buffer of the chain is no longer in guest memory");
  }
  c->seg = ch->seg;
  c->n = ch->n;
  c->rlen = ch->rlen;
  c->wlen = ch->wlen;
}

/* [off, off + len) inside a part of `size` bytes, from arguments 2 and 3 */
static void check_span(lua_State *L, uint64_t off, uint64_t len, uint64_t size, const char *part) {
  if (off > size || len > size - off)
    luaL_error(L, "kvm.virtio.chain: %I bytes at offset %I are outside the %s %I bytes",
               (lua_Integer)len, (lua_Integer)off, part, (lua_Integer)size);
}

static uint64_t check_offset(lua_State *L, int arg) {
  lua_Integer off = luaL_optinteger(L, arg, 0);
  luaL_argcheck(L, off >= 0, arg, "offset must not be negative");
  return (uint64_t)off;
}

/*** Bytes of the chain's readable part (what the driver wrote for the
device), by offset into it.
@function chain:read
@tparam[opt=0] integer offset
@tparam[opt] integer length default: to the end of the readable part
@treturn string
@raise past the readable part, or when the view has ended
*/
static int l_chain_read(lua_State *L) {
  Chain *ch = checkchain(L);
  uint64_t off = check_offset(L, 2);
  uint64_t len = off <= ch->rlen ? ch->rlen - off : 0;
  if (!lua_isnoneornil(L, 3)) {
    lua_Integer n = luaL_checkinteger(L, 3);
    luaL_argcheck(L, n >= 0, 3, "length must not be negative");
    len = (uint64_t)n;
  }
  check_span(L, off, len, ch->rlen, "readable");
  VirtioChain c;
  buffers(L, ch, &c, 0);
  luaL_Buffer b;
  char *p = luaL_buffinitsize(L, &b, (size_t)len);
  virtio_chain_read(&c, off, p, len);
  luaL_pushresultsize(&b, (size_t)len);
  return 1;
}

/*** Put bytes in the chain's writable part (what the device gives the
driver), by offset into it.
@function chain:write
@tparam integer offset
@tparam string data
@treturn integer offset + #data: where the next bytes would go
@raise past the writable part, or when the view has ended
*/
static int l_chain_write(lua_State *L) {
  Chain *ch = checkchain(L);
  luaL_checkinteger(L, 2);
  uint64_t off = check_offset(L, 2);
  size_t len;
  const char *s = luaL_checklstring(L, 3, &len);
  check_span(L, off, len, ch->wlen, "writable");
  VirtioChain c;
  buffers(L, ch, &c, 1);
  virtio_chain_write(&c, off, s, len);
  uint64_t end = off + len;
  if (end > ch->high) ch->high = end;
  lua_pushinteger(L, (lua_Integer)end);
  return 1;
}

/*** Hand the chain back to the driver: an entry in the used ring saying
how many bytes of the writable part the device wrote. The view ends; the
interrupt is raised when the on_queue call returns.
@function chain:done
@tparam[opt] integer written 0..chain.writable; default: the end of the
  furthest chain:write
@raise past the writable part, or when the view has ended
*/
static int l_chain_done(lua_State *L) {
  Chain *ch = checkchain(L);
  uint64_t written = ch->high;
  if (!lua_isnoneornil(L, 2)) {
    lua_Integer n = luaL_checkinteger(L, 2);
    if (n < 0 || (uint64_t)n > ch->wlen || n > 0xffffffffll)
      luaL_error(L, "kvm.virtio.chain: %I bytes written, but the writable part is %I bytes", n,
                 (lua_Integer)ch->wlen);
    written = (uint64_t)n;
  }
  if (written > 0xffffffffu) written = 0xffffffffu;
  VLua *d = ch->d;
  LuaQueue *lq = &d->lq[ch->q];
  Live *rec = &lq->live[ch->slot];
  ch->done = 1;
  rec->on = 0;
  lq->freel[lq->nfree++] = (uint16_t)ch->slot;
  if (rec->gen != d->gen) return 0;         /* the driver reset the device since */
  lq->inflight--;
  if (virtio_queue_push(&d->v, ch->q, ch->head, (uint32_t)written) == 0) {
    d->used = 1;
    d->used_chains++;
  }
  return 0;
}

/* fields: readable, writable (bytes), head (the descriptor index), queue */
static int l_chain_index(lua_State *L) {
  static const char *const names[] = {"readable", "writable", "head", "queue", NULL};
  Chain *ch = luaL_checkudata(L, 1, CHAIN_MT);
  switch (field_or_method(L, names)) {
  case 0: lua_pushinteger(L, (lua_Integer)ch->rlen); break;
  case 1: lua_pushinteger(L, (lua_Integer)ch->wlen); break;
  case 2: lua_pushinteger(L, ch->head); break;
  case 3: lua_pushinteger(L, ch->q); break;
  default: break;
  }
  return 1;
}

static int l_chain_tostring(lua_State *L) {
  Chain *ch = luaL_checkudata(L, 1, CHAIN_MT);
  LuaQueue *lq = &ch->d->lq[ch->q];
  const char *state = ch->done ? " (done)" : (!lq->busy || lq->seq != ch->seq) ? " (ended)" : "";
  lua_pushfstring(L, "kvm.virtio.chain %d of queue %d: %I readable, %I writable%s", (int)ch->head, ch->q,
                  (lua_Integer)ch->rlen, (lua_Integer)ch->wlen, state);
  return 1;
}

/* ---- the device ---- */

static const VirtioType script_type = {
  .kind = "virtio",
  .notify = vlua_notify,
  .reset = vlua_reset,
  .stats = vlua_stats,
};

/* Snapshots: the transport (registers, queues, config) is saved as a C
   device's is; what the script keeps (its tables) is the script's. A chain
   the script holds cannot be saved, so a snapshot is refused while one is
   held or taken; a restore forgets the chains of the calls before it. */
static int vlua_save(Device *dv, SnapBuf *b, char *err, size_t errlen) {
  VLua *d = (VLua *)dv;
  int held = 0;
  for (int i = 0; i < VIRTIO_MAX_QUEUES; i++) held += d->lq[i].inflight;
  if (held || d->pending) {
    snprintf(err, errlen, "%d chain%s held by the script%s: finish them (chain:done) first", held,
             held == 1 ? "" : "s", d->pending ? ", a notify not yet handled" : "");
    return -1;
  }
  return virtio_save(dv, b, err, errlen);
}

static int vlua_restore(Device *dv, const uint8_t *p, size_t n, int apply, char *err, size_t errlen) {
  if (virtio_restore(dv, p, n, apply, err, errlen) < 0) return -1;
  if (apply) {
    VLua *d = (VLua *)dv;
    d->gen++;                    /* views of the calls before are dropped */
    d->pending = 0;
    for (int i = 0; i < VIRTIO_MAX_QUEUES; i++) {
      d->lq[i].nheld = 0;
      d->lq[i].inflight = 0;
    }
  }
  return 0;
}

static const DeviceOps script_ops = {
  .kind = "virtio-lua",
  .access = vlua_access,
  .close = virtio_close,
  .stats = virtio_stats,
  .save = vlua_save,
  .restore = vlua_restore,
  .lua = 1,
};

/* the Lua device at index 1, or raise */
static VLua *checklua(lua_State *L, const char *method) {
  Virtio *v = luaL_checkudata(L, 1, VIRTIO_MT);
  if (v->dev.closed) luaL_error(L, "attempt to use a closed kvm.virtio");
  if (v->dev.ops != &script_ops)
    luaL_error(L, "%s: the %s device is not a Lua device (vm:virtio)", method, v->type->kind);
  return (VLua *)v;
}

/* dev:set_config (its doc is virtio.c's, with kvm.virtio's methods) */
int l_virtio_set_config(lua_State *L) {
  VLua *d = checklua(L, "set_config");
  size_t len;
  const char *s = luaL_checklstring(L, 2, &len);
  luaL_argcheck(L, len <= VIRTIO_CONFIG_MAX, 2, "at most 256 bytes");
  Virtio *v = &d->v;
  memset(v->config, 0, sizeof v->config);
  memcpy(v->config, s, len);
  v->config_len = (uint32_t)len;
  v->config_gen++;
  if (v->status & VIRTIO_S_DRIVER_OK) virtio_interrupt(v, VIRTIO_ISR_CONFIG);
  lua_settop(L, 1);
  return 1;
}

/* dev:process (its doc is virtio.c's) */
int l_virtio_process(lua_State *L) {
  VLua *d = checklua(L, "process");
  lua_Integer q = luaL_checkinteger(L, 2);
  luaL_argcheck(L, q >= 0 && q < d->type.nqueues, 2, "no such queue");
  Virtio *v = &d->v;
  if (v->q[q].ready && (v->status & VIRTIO_S_DRIVER_OK) && !(v->status & VIRTIO_S_NEEDS_RESET))
    d->pending |= 1u << q;
  BusCall bc;
  method_call(L, &bc);
  if (serve(d, &bc) == BUS_ERROR) return lua_error(L);
  lua_settop(L, 1);
  return 1;
}

static void push_classes(lua_State *L) {
  static const luaL_Reg qmethods[] = { {"pop", l_queue_pop}, {"chains", l_queue_chains}, {NULL, NULL} };
  static const luaL_Reg qmeta[] = { {"__index", l_queue_index}, {"__tostring", l_queue_tostring}, {NULL, NULL} };
  static const luaL_Reg cmethods[] = {
    {"read", l_chain_read}, {"write", l_chain_write}, {"done", l_chain_done}, {NULL, NULL}
  };
  static const luaL_Reg cmeta[] = { {"__index", l_chain_index}, {"__tostring", l_chain_tostring}, {NULL, NULL} };
  if (luaL_getmetatable(L, QUEUE_MT) == LUA_TNIL) kvm_new_class(L, QUEUE_MT, qmethods, qmeta);
  lua_pop(L, 1);
  if (luaL_getmetatable(L, CHAIN_MT) == LUA_TNIL) kvm_new_class(L, CHAIN_MT, cmethods, cmeta);
  lua_pop(L, 1);
}

/* opts.type: "block", "console", "entropy" or a device id */
static uint32_t check_type(lua_State *L) {
  static const char *const names[] = {"block", "console", "entropy", NULL};
  static const uint32_t ids[] = {2, 3, 4};
  int t = lua_getfield(L, 2, "type");
  uint32_t id = 0;
  if (t == LUA_TSTRING) {
    const char *s = lua_tostring(L, -1);
    for (int i = 0; names[i]; i++) if (strcmp(s, names[i]) == 0) id = ids[i];
    if (id == 0) luaL_error(L, "vm:virtio: unknown 'type' '%s' (block, console, entropy or a device id)", s);
  } else {
    int isnum;
    lua_Integer n = lua_tointegerx(L, -1, &isnum);
    if (t != LUA_TNUMBER || !isnum || n < 1 || n > 0xffff)
      luaL_error(L, "vm:virtio: 'type' must be \"block\", \"console\", \"entropy\" or a device id in 1..65535, got %s",
                 luaL_tolstring(L, -1, NULL));
    id = (uint32_t)n;
  }
  lua_pop(L, 1);
  return id;
}

/*** Attach a virtio device written in Lua (virtio-mmio): the transport, its
checks and interrupts are the core's; the device's queues are the script's.
At each notify of queue q by the driver (and when the driver or the queue
becomes ready) `on_queue(queue)` is called with a kvm.virtio.queue, valid
during the call: `queue:pop()` / `queue:chains()` give the chains, each a
view (kvm.virtio.chain, valid during the call) with `readable` and
`writable` (bytes), `chain:read(off, len)`, `chain:write(off, data)` and
`chain:done(written)`, which puts it in the used ring. A chain not done is
held and popped first at the next call (dev:process(q) makes one). When a
call used chains, the used interrupt follows. The fields `queue.index`,
`queue.num`, `queue.driver_features` (what the driver accepted, also
`dev.driver_features`) and `queue.device` help. The handler runs on the thread of the Lua state, one at
a time, a vCPU waiting; its error ends run() with it. The guest finds the
device through the ACPI DSDT (kvm.linux's `virtio` option). A snapshot
(vm:snapshot) keeps its transport (registers, queues, config), not what the
script's tables keep, and is refused while the script holds a chain.
@function vm:virtio
@tparam table opts `type` ("block", "console", "entropy" or a device id,
  required), `on_queue` (function(queue), required), `queues` (1..8,
  default 1), `features` (the device type's feature bits offered, 0-23 and
  50-63; VIRTIO_F_VERSION_1 is always offered, other transport bits are
  refused), `config` (the configuration space, a string of at most 256
  bytes, default empty: see set_config), `base`, `irq` as for
  `vm:virtio_blk`
@treturn kvm.virtio the device
@raise on a bad option or a taken address range
@usage local rng = vm:virtio{ type = "entropy", on_queue = function(q)
  for c in q:chains() do c:done(c:write(0, ("\x2a"):rep(c.writable))) end
end }
*/
int l_vm_virtio(lua_State *L) {
  static const char *const keys[] = {"type", "on_queue", "queues", "features", "config", NULL};
  kvm_checkvm(L, 1);
  kvm_opt_table(L, 2);
  uint32_t id = check_type(L);
  if (lua_getfield(L, 2, "on_queue") != LUA_TFUNCTION)
    return luaL_error(L, "vm:virtio: 'on_queue' must be a function, got %s", luaL_typename(L, -1));
  lua_pop(L, 1);
  int isnum = 1;
  lua_Integer nq = 1;
  if (lua_getfield(L, 2, "queues") != LUA_TNIL) nq = lua_tointegerx(L, -1, &isnum);
  if (!isnum || nq < 1 || nq > VIRTIO_MAX_QUEUES)
    return luaL_error(L, "vm:virtio: 'queues' must be an integer in 1..%d, got %s", VIRTIO_MAX_QUEUES,
                      luaL_tolstring(L, -1, NULL));
  lua_pop(L, 1);
  lua_Integer feat = 0;
  if (lua_getfield(L, 2, "features") != LUA_TNIL) feat = lua_tointegerx(L, -1, &isnum);
  if (!isnum)
    return luaL_error(L, "vm:virtio: 'features' must be an integer, got %s", luaL_tolstring(L, -1, NULL));
  lua_pop(L, 1);
  uint64_t bad = (uint64_t)feat & TRANSPORT_FEATURES & ~VIRTIO_F_VERSION_1;
  if (bad)
    return luaL_error(L, "vm:virtio: 'features' bit %d is the transport's (bits 24-49: it offers VERSION_1 only)",
                      __builtin_ctzll(bad));
  size_t clen = 0;
  const char *config = "";
  int ct = lua_getfield(L, 2, "config");
  if (ct == LUA_TSTRING) config = lua_tolstring(L, -1, &clen);
  else if (ct != LUA_TNIL) return luaL_error(L, "vm:virtio: 'config' must be a string, got %s", luaL_typename(L, -1));
  if (clen > VIRTIO_CONFIG_MAX)
    return luaL_error(L, "vm:virtio: 'config' is at most %d bytes, got %d", VIRTIO_CONFIG_MAX, (int)clen);
  lua_pop(L, 1);                            /* the options table still holds the string */
  push_classes(L);
  VLua *d = (VLua *)virtio_new(L, sizeof(VLua), &script_ops, &script_type, (uint64_t)feat, keys);
  int dev = lua_gettop(L);
  d->type = script_type;
  d->type.device_id = id;
  d->type.nqueues = (int)nq;
  d->v.type = &d->type;
  memcpy(d->v.config, config, clen);
  d->v.config_len = (uint32_t)clen;
  lua_getfield(L, 2, "on_queue");
  d->fn = kvm_vm_ref(L, 1, -1);
  lua_pop(L, 1);
  for (int i = 0; i < nq; i++) {
    QueueView *qv = lua_newuserdatauv(L, sizeof(QueueView), 1);
    qv->d = d;
    qv->q = i;
    lua_pushvalue(L, dev);
    lua_setiuservalue(L, -2, 1);
    luaL_setmetatable(L, QUEUE_MT);
    d->lq[i].ref = kvm_vm_ref(L, 1, -1);
    lua_pop(L, 1);
  }
  lua_settop(L, dev);
  return 1;
}
