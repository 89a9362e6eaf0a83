/*
** snapdev.h - what the devices' DeviceOps.save and .restore share (bus.h,
** snapshot.h): the version word, one- and two-byte fields, the end of a
** state, and the message of a check that failed.
**
** A device's state is a version (u32) and then fields in the device's own
** order, host byte order (x86-64: little-endian), with no padding. Its
** restore reads it back with a SnapRd and checks every field before it
** changes anything: the bytes come from a file and are untrusted. Both are
** called with the device's lock held (vm:snapshot and vm:restore take it). A check
** fails with a message naming the field and the value, without the device
** (vm:restore says which device it was).
*/
#ifndef LUAKVM_SNAPDEV_H
#define LUAKVM_SNAPDEV_H

#include <stdarg.h>
#include <stdio.h>

#include "snapshot.h"

static inline void snapbuf_u8(SnapBuf *b, uint8_t v) { snapbuf_put(b, &v, 1); }
static inline void snapbuf_u16(SnapBuf *b, uint16_t v) { snapbuf_put(b, &v, 2); }
static inline uint8_t snaprd_u8(SnapRd *r) { uint8_t v; snaprd_get(r, &v, 1); return v; }
static inline uint16_t snaprd_u16(SnapRd *r) { uint16_t v; snaprd_get(r, &v, 2); return v; }

/* a check's message in err: -1 */
static inline __attribute__((format(printf, 3, 4)))
int snapdev_fail(char *err, size_t errlen, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
  return -1;
}

/* the end of a save: 0, or -1 when the buffer could not grow */
static inline int snapdev_saved(const SnapBuf *b, char *err, size_t errlen) {
  if (!b->oom) return 0;
  return snapdev_fail(err, errlen, "out of memory");
}

/* the version word first: 0 when it is `want`, else -1 with a message */
static inline int snapdev_version(SnapRd *r, uint32_t want, char *err, size_t errlen) {
  uint32_t v = snaprd_u32(r);
  if (r->bad) return snapdev_fail(err, errlen, "state of %zu bytes, too short for a version", r->n);
  if (v != want) return snapdev_fail(err, errlen, "state version %u (this build reads %u)", v, want);
  return 0;
}

/* after the last field: every byte read and none left over; 0 or -1 */
static inline int snapdev_end(const SnapRd *r, char *err, size_t errlen) {
  if (r->bad) return snapdev_fail(err, errlen, "state truncated (%zu bytes)", r->n);
  if (r->off != r->n)
    return snapdev_fail(err, errlen, "state of %zu bytes, %zu more than its fields", r->n, r->n - r->off);
  return 0;
}

#endif
