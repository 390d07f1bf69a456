// Tight MMU-notifier load for bench/overhead: one KVM VM with one memslot (plus, with a second
// argument S > 1, S - 1 more one-page memslots elsewhere, so the VM has S memslots), then N
// madvise(MADV_DONTNEED) calls of 4 KiB on the first slot's memory. Prints N, wall-clock ns per
// call and the thread's CPU ns per call (user + system: BPF programs on its syscalls run in its
// context and count, time spent descheduled by other load does not).
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    size_t sz = 2 << 20;
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) { perror("open /dev/kvm"); return 2; }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) { perror("KVM_CREATE_VM"); return 2; }
    uint8_t *mem = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) { perror("mmap"); return 2; }
    madvise(mem, sz, MADV_NOHUGEPAGE);
    struct kvm_userspace_memory_region r = {.slot = 0, .guest_phys_addr = 0, .memory_size = sz,
                                            .userspace_addr = (uint64_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0) { perror("KVM_SET_USER_MEMORY_REGION"); return 2; }
    long extra = argc > 2 ? atol(argv[2]) - 1 : 0;
    if (extra > 0) {
        uint8_t *more = mmap(NULL, extra * 4096, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (more == MAP_FAILED) { perror("mmap"); return 2; }
        for (long i = 0; i < extra; i++) {
            struct kvm_userspace_memory_region m = {.slot = 1 + i, .guest_phys_addr = sz + i * 4096,
                                                    .memory_size = 4096,
                                                    .userspace_addr = (uint64_t)(more + i * 4096)};
            if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &m) < 0) { perror("KVM_SET_USER_MEMORY_REGION"); return 2; }
        }
    }
    struct timespec a, b, ca, cb;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ca);
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        madvise(mem + (i % 512) * 4096, 4096, MADV_DONTNEED);
    clock_gettime(CLOCK_MONOTONIC, &b);
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cb);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    double cns = (cb.tv_sec - ca.tv_sec) * 1e9 + (cb.tv_nsec - ca.tv_nsec);
    printf("%ld %.1f %.1f\n", n, ns / n, cns / n);
    close(vm);
    return 0;
}
