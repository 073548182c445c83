/*
 * The server side of the channel (docs/protocol.md), one copy for the agent
 * and the stub. The includer defines sys6(n, a..f), its way into the kernel,
 * before including this.
 *
 * Trust: the slot is in memory the target (or a guest) can write. Only a
 * request numbered exactly `want` is served; any other value is junk.
 */
#ifndef PVMEXEC_CHANNEL_H
#define PVMEXEC_CHANNEL_H
#include "layout.h"
#include "freestanding/freestanding.h"

/*
 * Wait for request `want`: spin while the caller runs on another CPU (only
 * then can it answer without us yielding), then sleep on req_seq once, for
 * at most *idle. Returns want when it is there, 0 otherwise (after the sleep:
 * the includer re-checks and calls again); *timed_out says the sleep ran out.
 */
static uint32_t chan_wait(struct pvm_slot *slot, uint32_t want, const struct timespec_ *idle, int *timed_out)
{
    uint32_t seq = ld(&slot->req_seq);
    uint32_t budget = ld(&slot->caller_cpu) == this_cpu() ? 0 : slot->spin;
    for (uint32_t spins = budget; seq != want && spins; spins--) {
        __builtin_ia32_pause();
        seq = ld(&slot->req_seq);
    }
    *timed_out = 0;
    if (seq == want)
        return want;
    st(&slot->agent_sleeping, 1);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (ld(&slot->req_seq) == seq)
        *timed_out = sys6(__NR_futex, (long)&slot->req_seq, FUTEX_WAIT, seq, (long)idle, 0, 0) == -ETIMEDOUT;
    st(&slot->agent_sleeping, 0);
    return 0;
}

/* Answer request seq: publish it, and wake the caller if it sleeps. */
static void chan_respond(struct pvm_slot *slot, uint32_t seq)
{
    st(&slot->agent_cpu, this_cpu());
    st(&slot->resp_seq, seq);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (ld(&slot->caller_sleeping))
        sys6(__NR_futex, (long)&slot->resp_seq, FUTEX_WAKE, 1, 0, 0, 0);
}

#endif
