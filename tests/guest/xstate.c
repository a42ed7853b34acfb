/*
 * Guest side (runs inside an sbx guest, as an untrusted guest program; the
 * host's test builds it with `gcc -static` and only reads its output):
 * does each process keep its own extended CPU state (AVX ymm, AVX-512 zmm
 * and opmask registers) across context switches, signals and fork?
 *
 *   xstate probe                what user mode sees: CPUID, XCR0, whether a
 *                               VEX (AVX2) and an EVEX (AVX-512) instruction
 *                               run or raise SIGILL
 *   xstate stress N SECS [force] N processes hold distinct patterns in every
 *                               vector register through long busy loops,
 *                               check them, count failures and the context
 *                               switches they went through
 *   xstate signals SECS [force] a pattern held while a SIGALRM handler
 *                               that clobbers every vector register runs
 *                               every 10 ms; the handler also checks that
 *                               its frame carries the extended state
 *   xstate fork [force]         a pattern held across a raw fork()
 *   xstate sum N                N processes compute a checksum of a 4 MiB
 *                               buffer with compiler-generated AVX2 code,
 *                               several times each, against the scalar one
 *   xstate pingpong N           N round trips of a byte between two
 *                               processes over pipes, and N getppid()
 *                               calls; microseconds each
 *   xstate sigcost N            N signals raised and handled; microseconds
 *                               each
 *   xstate kbench N             the guest kernel's own figures (sbx_pvm
 *                               kernels, as root): N XSAVE+XRSTOR pairs
 *                               through its user-mode trampoline, N
 *                               FXSAVE+FXRSTOR pairs (emulated), N empty
 *                               trips to the trampoline, N switches to its
 *                               page tables and back, timed from user mode
 *
 * Vector code is used only where CPUID and XCR0 say the OS enabled it
 * (OSXSAVE and the XCR0 bits), as every well-behaved program does, unless
 * "force" is given: that is how a program that ignores the protocol
 * behaves. Every result is one "key=value ..." line; the exit status is 0
 * unless the program itself failed (a check failing is reported, not an
 * exit status, so that the caller sees the counts).
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

static void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4])
{
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static uint64_t xgetbv0(void)
{
	uint32_t a, d;
	__asm__ volatile("xgetbv" : "=a"(a), "=d"(d) : "c"(0));
	return ((uint64_t)d << 32) | a;
}

/* What CPUID and XCR0 offer, the way glibc, LLVM and V8 decide it. */
struct offer {
	int osxsave, avx, avx2, avx512f;
	uint64_t xcr0;
	int use_avx2, use_avx512;
};

static struct offer offer(int force)
{
	struct offer o = {0};
	uint32_t r[4];
	cpuid(1, 0, r);
	o.osxsave = (r[2] >> 27) & 1;
	o.avx = (r[2] >> 28) & 1;
	cpuid(7, 0, r);
	o.avx2 = (r[1] >> 5) & 1;
	o.avx512f = (r[1] >> 16) & 1;
	if (o.osxsave)
		o.xcr0 = xgetbv0();
	o.use_avx2 = o.avx && o.avx2 && (o.xcr0 & 6) == 6;
	o.use_avx512 = o.use_avx2 && o.avx512f && (o.xcr0 & 0xe6) == 0xe6;
	if (force) {
		o.use_avx2 = o.avx && o.avx2;
		o.use_avx512 = o.use_avx2 && o.avx512f;
	}
	return o;
}

static sigjmp_buf probe_jb;
static void probe_sig(int s)
{
	siglongjmp(probe_jb, s);
}

static const char *try_vex(void)
{
	if (sigsetjmp(probe_jb, 1))
		return "sigill";
	__asm__ volatile("vpcmpeqd %%ymm1, %%ymm1, %%ymm1\n\tvpaddd %%ymm1, %%ymm1, %%ymm1" ::: "xmm1");
	return "runs";
}

static const char *try_evex(void)
{
	if (sigsetjmp(probe_jb, 1))
		return "sigill";
	__asm__ volatile(".byte 0x62,0xf3,0x75,0x48,0x25,0xc9,0xff" ::: "xmm1"); /* vpternlogd $0xff,%zmm1,%zmm1,%zmm1 */
	return "runs";
}

static int probe(void)
{
	struct offer o = offer(0);
	uint32_t r[4];
	cpuid(1, 0, r);
	int xsave = (r[2] >> 26) & 1;
	uint64_t xcr0 = 0;
	const char *xg = "sigill";
	signal(SIGILL, probe_sig);
	if (!sigsetjmp(probe_jb, 1)) {
		xcr0 = xgetbv0();
		xg = "runs";
	}
	const char *vex = try_vex(), *evex = try_evex();
	signal(SIGILL, SIG_DFL);
	printf("probe xsave=%d osxsave=%d avx=%d avx2=%d avx512f=%d xgetbv=%s xcr0=%#llx vex=%s evex=%s "
	       "offered_avx2=%d offered_avx512=%d\n",
	       xsave, o.osxsave, o.avx, o.avx2, o.avx512f, xg, (unsigned long long)xcr0, vex, evex, o.use_avx2,
	       o.use_avx512);
	return 0;
}

/* ---- Patterns held in registers ---------------------------------------- */

/* 16 ymm registers, or 32 zmm registers and k1-k7. */
struct regs {
	uint8_t v[32][64] __attribute__((aligned(64)));
	uint64_t k[8];
};

static void fill(struct regs *p, unsigned seed)
{
	for (int r = 0; r < 32; r++)
		for (int b = 0; b < 64; b++)
			p->v[r][b] = (uint8_t)(seed * 131 + r * 7 + b * 13 + 1);
	for (int k = 0; k < 8; k++)
		p->k[k] = 0x0101010101010101ull * (uint8_t)(seed * 17 + k * 3 + 5);
}

/* Loads ymm0-15, spins `spin` iterations touching no vector register,
 * stores ymm0-15. */
static void hold_ymm(const struct regs *in, struct regs *out, long spin)
{
	__asm__ volatile(
#define L(n) "vmovdqu " #n "*64(%[in]), %%ymm" #n "\n\t"
		L(0) L(1) L(2) L(3) L(4) L(5) L(6) L(7) L(8) L(9) L(10) L(11) L(12) L(13) L(14) L(15)
#undef L
		"mov %[spin], %%rcx\n"
		"1:\tdec %%rcx\n\tjnz 1b\n\t"
#define S(n) "vmovdqu %%ymm" #n ", " #n "*64(%[out])\n\t"
		S(0) S(1) S(2) S(3) S(4) S(5) S(6) S(7) S(8) S(9) S(10) S(11) S(12) S(13) S(14) S(15)
#undef S
		:
		: [in] "r"(in), [out] "r"(out), [spin] "r"(spin)
		: "rcx", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
		  "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}

/* The same with zmm0-31 and k1-k7. */
__attribute__((target("avx512f"))) static void hold_zmm(const struct regs *in, struct regs *out, long spin)
{
	__asm__ volatile(
#define L(n) "vmovdqu64 " #n "*64(%[in]), %%zmm" #n "\n\t"
		L(0) L(1) L(2) L(3) L(4) L(5) L(6) L(7) L(8) L(9) L(10) L(11) L(12) L(13) L(14) L(15)
		L(16) L(17) L(18) L(19) L(20) L(21) L(22) L(23) L(24) L(25) L(26) L(27) L(28) L(29) L(30) L(31)
#undef L
#define K(n) "kmovw " #n "*8(%[kin]), %%k" #n "\n\t"
		K(1) K(2) K(3) K(4) K(5) K(6) K(7)
#undef K
		"mov %[spin], %%rcx\n"
		"1:\tdec %%rcx\n\tjnz 1b\n\t"
#define S(n) "vmovdqu64 %%zmm" #n ", " #n "*64(%[out])\n\t"
		S(0) S(1) S(2) S(3) S(4) S(5) S(6) S(7) S(8) S(9) S(10) S(11) S(12) S(13) S(14) S(15)
		S(16) S(17) S(18) S(19) S(20) S(21) S(22) S(23) S(24) S(25) S(26) S(27) S(28) S(29) S(30) S(31)
#undef S
#define K(n) "kmovw %%k" #n ", " #n "*8(%[kout])\n\t"
		K(1) K(2) K(3) K(4) K(5) K(6) K(7)
#undef K
		:
		: [in] "r"(in), [out] "r"(out), [spin] "r"(spin), [kin] "r"(in->k), [kout] "r"(out->k)
		: "rcx", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
		  "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20",
		  "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31",
		  "k1", "k2", "k3", "k4", "k5", "k6", "k7");
}

/* Does `out` hold what `in` was, for the registers the mode uses? */
static int same(const struct regs *in, const struct regs *out, int zmm)
{
	if (!zmm) {
		for (int r = 0; r < 16; r++)
			if (memcmp(in->v[r], out->v[r], 32))
				return 0;
		return 1;
	}
	for (int k = 1; k < 8; k++)
		if ((in->k[k] & 0xffff) != (out->k[k] & 0xffff))
			return 0;
	return !memcmp(in->v, out->v, sizeof in->v);
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static void switches(long *vol, long *nonvol)
{
	char line[256];
	FILE *f = fopen("/proc/self/status", "r");
	*vol = *nonvol = 0;
	if (!f)
		return;
	while (fgets(line, sizeof line, f)) {
		sscanf(line, "voluntary_ctxt_switches: %ld", vol);
		sscanf(line, "nonvoluntary_ctxt_switches: %ld", nonvol);
	}
	fclose(f);
}

/* One worker: rounds of hold-and-check until `secs` have passed. Reports
 * through `res`: rounds, failures, voluntary, nonvoluntary switches. */
static void worker(unsigned seed, double secs, int zmm, long res[4])
{
	static struct regs in, out;
	long spin = 2000000;
	fill(&in, seed);
	double end = now() + secs;
	long rounds = 0, bad = 0;
	while (now() < end) {
		memset(&out, 0, sizeof out);
		if (zmm)
			hold_zmm(&in, &out, spin);
		else
			hold_ymm(&in, &out, spin);
		rounds++;
		if (!same(&in, &out, zmm))
			bad++;
	}
	res[0] = rounds;
	res[1] = bad;
	switches(&res[2], &res[3]);
}

static int stress(int n, double secs, int force)
{
	struct offer o = offer(force);
	if (!o.use_avx2) {
		printf("stress mode=none offered_avx2=0 procs=%d rounds=0 failures=0 switches=0\n", n);
		return 0;
	}
	int fds[2];
	if (pipe(fds))
		return 1;
	for (int i = 0; i < n; i++) {
		if (fork() == 0) {
			long res[4];
			worker(i + 1, secs, o.use_avx512, res);
			if (write(fds[1], res, sizeof res) != sizeof res)
				_exit(1);
			_exit(0);
		}
	}
	close(fds[1]);
	long tot[4] = {0}, res[4];
	int got = 0;
	while (read(fds[0], res, sizeof res) == sizeof res) {
		for (int j = 0; j < 4; j++)
			tot[j] += res[j];
		got++;
	}
	while (wait(NULL) > 0)
		;
	printf("stress mode=%s procs=%d reported=%d rounds=%ld failures=%ld voluntary=%ld nonvoluntary=%ld "
	       "switches=%ld\n",
	       o.use_avx512 ? "zmm" : "ymm", n, got, tot[0], tot[1], tot[2], tot[3], tot[2] + tot[3]);
	return got == n ? 0 : 1;
}

/* ---- Signals ------------------------------------------------------------ */

static volatile long handled, framed;
static int sig_zmm;
static uint64_t sig_want;

/* Clobbers every vector register the mode uses, as a handler may, after
 * looking at the signal frame the way a program that inspects it does:
 * the FXSAVE area's software bytes carry FP_XSTATE_MAGIC1 and the
 * features saved, the XSAVE header which of them were in use. */
static void clobber(int s, siginfo_t *si, void *ctx)
{
	(void)s, (void)si;
	static struct regs junk, sink;
	const uint8_t *fp = (const uint8_t *)((ucontext_t *)ctx)->uc_mcontext.fpregs;
	uint32_t magic1;
	uint64_t features;
	memcpy(&magic1, fp + 464, 4);
	memcpy(&features, fp + 472, 8);
	if (magic1 == 0x46505853 && (features & sig_want) == sig_want)
		framed++;
	fill(&junk, 0xee + handled);
	if (sig_zmm)
		hold_zmm(&junk, &sink, 1);
	else
		hold_ymm(&junk, &sink, 1);
	handled++;
}

static int signals(double secs, int force)
{
	struct offer o = offer(force);
	if (!o.use_avx2) {
		printf("signals mode=none offered_avx2=0 rounds=0 failures=0 handled=0 frames_with_xstate=0\n");
		return 0;
	}
	sig_zmm = o.use_avx512;
	sig_want = o.use_avx512 ? 0xe7 : 0x7;
	struct sigaction sa = {0};
	sa.sa_sigaction = clobber;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigaction(SIGALRM, &sa, NULL);
	struct itimerval it = {{0, 10000}, {0, 10000}};
	setitimer(ITIMER_REAL, &it, NULL);
	long res[4];
	worker(7, secs, o.use_avx512, res);
	struct itimerval off = {{0, 0}, {0, 0}};
	setitimer(ITIMER_REAL, &off, NULL);
	printf("signals mode=%s rounds=%ld failures=%ld handled=%ld frames_with_xstate=%ld\n",
	       o.use_avx512 ? "zmm" : "ymm", res[0], res[1], handled, framed);
	return 0;
}

/* ---- fork ------------------------------------------------------------- */

static int forked(int force)
{
	struct offer o = offer(force);
	if (!o.use_avx2) {
		printf("fork mode=none offered_avx2=0 failures=0\n");
		return 0;
	}
	static struct regs in, out;
	fill(&in, 42);
	long pid;
	/* Load ymm0-15, fork by raw system call, store: both sides must see
	 * the pattern (the kernel keeps vector registers across system calls). */
	__asm__ volatile(
#define L(n) "vmovdqu " #n "*64(%[in]), %%ymm" #n "\n\t"
		L(0) L(1) L(2) L(3) L(4) L(5) L(6) L(7) L(8) L(9) L(10) L(11) L(12) L(13) L(14) L(15)
#undef L
		"mov %[nr], %%eax\n\tsyscall\n\t"
#define S(n) "vmovdqu %%ymm" #n ", " #n "*64(%[out])\n\t"
		S(0) S(1) S(2) S(3) S(4) S(5) S(6) S(7) S(8) S(9) S(10) S(11) S(12) S(13) S(14) S(15)
#undef S
		: "=a"(pid)
		: [in] "r"(in.v), [out] "r"(out.v), [nr] "i"(SYS_fork)
		: "rcx", "r11", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
		  "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
	int ok = same(&in, &out, 0);
	if (pid == 0)
		_exit(ok ? 0 : 3);
	int status = 0;
	waitpid(pid, &status, 0);
	int child_ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
	printf("fork mode=ymm failures=%d\n", !ok + !child_ok);
	return 0;
}

/* ---- A checksum in compiler-generated AVX2 code ------------------------- */

#define SUM_BYTES (4u << 20)

__attribute__((target("avx2"))) static uint64_t sum_avx2(const uint32_t *p, size_t n)
{
	__m256i acc = _mm256_setzero_si256(), mix = _mm256_set1_epi32(0x9e3779b1);
	for (size_t i = 0; i < n; i += 8) {
		__m256i x = _mm256_loadu_si256((const __m256i *)(p + i));
		x = _mm256_xor_si256(_mm256_mullo_epi32(x, mix), _mm256_srli_epi32(x, 7));
		acc = _mm256_add_epi64(acc, _mm256_cvtepu32_epi64(_mm256_castsi256_si128(x)));
		acc = _mm256_add_epi64(acc, _mm256_cvtepu32_epi64(_mm256_extracti128_si256(x, 1)));
		acc = _mm256_xor_si256(acc, _mm256_slli_epi64(acc, 1));
	}
	uint64_t l[4];
	_mm256_storeu_si256((__m256i *)l, acc);
	return l[0] ^ (l[1] * 3) ^ (l[2] * 5) ^ (l[3] * 7);
}

static uint64_t sum_scalar(const uint32_t *p, size_t n)
{
	uint64_t acc[4] = {0};
	for (size_t i = 0; i < n; i += 8) {
		uint32_t x[8];
		for (int j = 0; j < 8; j++)
			x[j] = (p[i + j] * 0x9e3779b1u) ^ (p[i + j] >> 7);
		for (int l = 0; l < 4; l++) {
			acc[l] += x[l];
			acc[l] += x[l + 4];
			acc[l] ^= acc[l] << 1;
		}
	}
	return acc[0] ^ (acc[1] * 3) ^ (acc[2] * 5) ^ (acc[3] * 7);
}

static int sum(int n)
{
	struct offer o = offer(0);
	size_t words = SUM_BYTES / 4;
	uint32_t *buf = malloc(SUM_BYTES);
	if (!buf)
		return 1;
	uint64_t x = 0x243f6a8885a308d3ull;
	for (size_t i = 0; i < words; i++) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		buf[i] = (uint32_t)x;
	}
	uint64_t want = sum_scalar(buf, words);
	if (!o.use_avx2) {
		printf("sum mode=scalar procs=0 runs=0 failures=0 checksum=%016llx\n", (unsigned long long)want);
		return 0;
	}
	int fds[2];
	if (pipe(fds))
		return 1;
	for (int i = 0; i < n; i++) {
		if (fork() == 0) {
			long bad = 0, runs = 0;
			double end = now() + 1.0;
			do {
				bad += sum_avx2(buf, words) != want;
				runs++;
			} while (now() < end || runs < 3);
			long res[2] = {runs, bad};
			if (write(fds[1], res, sizeof res) != sizeof res)
				_exit(1);
			_exit(0);
		}
	}
	close(fds[1]);
	long runs = 0, bad = 0, res[2];
	int got = 0;
	while (read(fds[0], res, sizeof res) == sizeof res)
		runs += res[0], bad += res[1], got++;
	while (wait(NULL) > 0)
		;
	printf("sum mode=avx2 procs=%d reported=%d runs=%ld failures=%ld checksum=%016llx\n", n, got, runs, bad,
	       (unsigned long long)want);
	return got == n ? 0 : 1;
}

/* ---- Context-switch cost ------------------------------------------------ */

static int pingpong(long n)
{
	int ab[2], ba[2];
	char c = 'x';
	if (pipe(ab) || pipe(ba))
		return 1;
	pid_t pid = fork();
	if (pid == 0) {
		for (long i = 0; i < n; i++)
			if (read(ab[0], &c, 1) != 1 || write(ba[1], &c, 1) != 1)
				_exit(1);
		_exit(0);
	}
	double t0 = now();
	for (long i = 0; i < n; i++)
		if (write(ab[1], &c, 1) != 1 || read(ba[0], &c, 1) != 1)
			return 1;
	double t = now() - t0;
	waitpid(pid, NULL, 0);
	double t1 = now();
	for (long i = 0; i < n; i++)
		syscall(SYS_getppid);
	double s = now() - t1;
	printf("pingpong round_trips=%ld us_per_round_trip=%.1f us_per_getppid=%.1f\n", n, t * 1e6 / n, s * 1e6 / n);
	return 0;
}

static void nothing(int s)
{
	(void)s;
}

static int sigcost(long n)
{
	signal(SIGUSR1, nothing);
	double t0 = now();
	for (long i = 0; i < n; i++)
		raise(SIGUSR1);
	double t = now() - t0;
	printf("sigcost signals=%ld us_per_signal=%.1f\n", n, t * 1e6 / n);
	return 0;
}

static double kbench1(const char *what, long n)
{
	char cmd[32];
	FILE *f = fopen("/proc/sbx_xstate", "w");
	if (!f)
		return -1;
	snprintf(cmd, sizeof cmd, "%s %ld\n", what, n);
	double t0 = now();
	int ok = fputs(cmd, f) >= 0 && fflush(f) == 0;
	double t = now() - t0;
	fclose(f);
	return ok ? t * 1e6 / n : -1;
}

static int kbench(long n)
{
	double x = kbench1("xsave", n), fx = kbench1("fxsave", n), nop = kbench1("nop", n), cr3 = kbench1("cr3", n);
	printf("kbench n=%ld us_per_xsave_xrstor_pair=%.1f us_per_fxsave_fxrstor_pair=%.1f us_per_empty_trip=%.1f "
	       "us_per_cr3_switch_and_back=%.1f\n",
	       n, x, fx, nop, cr3);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	const char *cmd = argc > 1 ? argv[1] : "probe";
	int force = argc > 2 && !strcmp(argv[argc - 1], "force");
	if (!strcmp(cmd, "probe"))
		return probe();
	if (!strcmp(cmd, "stress") && argc > 3)
		return stress(atoi(argv[2]), atof(argv[3]), force);
	if (!strcmp(cmd, "signals") && argc > 2)
		return signals(atof(argv[2]), force);
	if (!strcmp(cmd, "fork"))
		return forked(force);
	if (!strcmp(cmd, "sum") && argc > 2)
		return sum(atoi(argv[2]));
	if (!strcmp(cmd, "pingpong") && argc > 2)
		return pingpong(atol(argv[2]));
	if (!strcmp(cmd, "sigcost") && argc > 2)
		return sigcost(atol(argv[2]));
	if (!strcmp(cmd, "kbench") && argc > 2)
		return kbench(atol(argv[2]));
	fprintf(stderr, "usage: xstate probe | stress N SECS [force] | signals SECS [force] | fork [force] | sum N | "
			"pingpong N | sigcost N | kbench N\n");
	return 2;
}
