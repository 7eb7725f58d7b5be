"""A plain-Python prompt lookup (the reference for decoding/lookup.py) and the accepted drafts per
verify step it implies, given greedy decoding's continuation."""


def py_lookup(seq, k1, max_ngram, min_ngram):
    """Plain-Python prompt lookup on the whole sequence (its last token is next_token)."""
    last = len(seq) - 1
    for n in range(max_ngram, min_ngram - 1, -1):
        if n > len(seq):
            continue
        query = seq[-n:]
        for s in range(last - n, -1, -1):
            if seq[s:s + n] == query:
                cont = seq[s + n:s + n + k1]
                return cont + [seq[-1]] * (k1 - len(cont))  # no fallback: repeat next_token
    return [seq[-1]] * k1


def expected_accepted(prompt, continuation, stop_ids, max_new, k):
    """Accepted drafts per verify step, from greedy's continuation (long enough to look past
    the stop id and the limit, as the loop's acceptance does)."""
    accepted_log, emitted = [], 1
    done = continuation[0] in stop_ids or max_new <= 1
    while not done:
        seq = prompt + continuation[:emitted]
        drafts = py_lookup(seq, k - 1, 3, 1)
        truth = continuation[emitted:emitted + k]
        acc = 0
        while acc < k - 1 and drafts[acc] == truth[acc]:
            acc += 1
        accepted_log.append(acc)
        block = truth[:acc + 1]
        stops = [i for i, t in enumerate(block) if t in stop_ids]
        step = stops[0] + 1 if stops else len(block)
        step = min(step, max_new - emitted)
        emitted += step
        done = bool(stops and stops[0] < step) or emitted >= max_new
    return accepted_log
