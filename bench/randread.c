/*
** randread.c - 4 KiB random reads from a block device, for the disk rows of
** `make bench` (bench/disk.lua): linked statically and put in the guest's
** initramfs, where Debian's fio is not (busybox only). A loop of `dd skip=`
** would time the guest's fork and exec, not the disk.
**
**   randread DEVICE N   N reads of 4096 bytes, one at a time (queue depth
**                       1), O_DIRECT (no page cache), at 4 KiB-aligned
**                       offsets from a fixed-seed xorshift over the device;
**                       prints "randread N 4096 SECONDS" (the guest's
**                       CLOCK_MONOTONIC)
*/
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  if (argc != 3) { fprintf(stderr, "usage: randread DEVICE N\n"); return 2; }
  long n = atol(argv[2]);
  int fd = open(argv[1], O_RDONLY | O_DIRECT | O_CLOEXEC);
  if (fd < 0) { perror(argv[1]); return 1; }
  uint64_t size = 0;
  if (ioctl(fd, BLKGETSIZE64, &size) < 0) { perror("BLKGETSIZE64"); return 1; }
  uint64_t blocks = size / BLOCK;
  if (blocks == 0 || n <= 0) { fprintf(stderr, "randread: nothing to read\n"); return 1; }
  void *buf;
  if (posix_memalign(&buf, BLOCK, BLOCK) != 0) { fprintf(stderr, "randread: no memory\n"); return 1; }
  uint64_t x = 0x9e3779b97f4a7c15u;
  double t0 = now();
  for (long i = 0; i < n; i++) {
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    if (pread(fd, buf, BLOCK, (off_t)((x % blocks) * BLOCK)) != BLOCK) { perror("pread"); return 1; }
  }
  double t1 = now();
  printf("randread %ld %d %.6f\n", n, BLOCK, t1 - t0);
  return 0;
}
