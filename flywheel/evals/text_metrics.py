"""How close an answer's words are to a reference answer's: ROUGE-L and BLEU, written out here.

Both are the textbook definitions, over lower-cased word tokens (runs of letters and digits; punctuation
and JSON's quotes and braces are dropped, so `{"answer": "..."}` compares by its words):

  ROUGE-L  the F1 of the longest common subsequence (LCS) of answer and reference tokens: precision is
           LCS / answer length, recall LCS / reference length. Per item, averaged over the items.
  BLEU     corpus BLEU-4 (Papineni et al. 2002): clipped 1- to 4-gram precisions summed over all items,
           their geometric mean times the brevity penalty exp(1 - reference length / answer length)
           when the answers are shorter. An order with no match at all is smoothed as sacrebleu's
           default "exp" method does (1 / (2^k * total) for the k-th such order), so one missing
           4-gram does not zero the score.

Neither needs a library: `rouge-score` pulls in nltk and absl, `sacrebleu` lxml, portalocker and more,
for twenty lines of arithmetic. The numbers are the same definitions on our tokens, not sacrebleu's
13a tokenizer, so compare them between models evaluated here, not with published scores.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

BLEU_ORDER = 4
_WORD = re.compile(r"\w+")


class ReferenceScores(BaseModel):
    """ROUGE-L and BLEU of one model's answers over the `n` items of a set that have a reference answer."""

    model_config = ConfigDict(extra="forbid")

    n: int
    rouge_l: float  # mean ROUGE-L F1, 0..1
    bleu: float  # corpus BLEU-4, 0..1 (papers print it x100)


def tokens(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, in O(len(a) * len(b)) time and O(len(b)) memory."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 of one answer against one reference (0 when either has no words)."""
    a, r = tokens(answer), tokens(reference)
    common = lcs_length(a, r)
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(answers: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 of the answers against one reference each, 0..1 (see the module docstring)."""
    if len(answers) != len(references):
        raise ValueError("every answer needs one reference")
    matched = [0] * BLEU_ORDER
    total = [0] * BLEU_ORDER
    answer_length = reference_length = 0
    for answer, reference in zip(answers, references):
        a, r = tokens(answer), tokens(reference)
        answer_length += len(a)
        reference_length += len(r)
        for n in range(1, BLEU_ORDER + 1):
            mine, theirs = _ngrams(a, n), _ngrams(r, n)
            matched[n - 1] += sum(min(count, theirs[gram]) for gram, count in mine.items())
            total[n - 1] += max(len(a) - n + 1, 0)
    if matched[0] == 0 or total[-1] == 0:
        return 0.0  # no word in common, or too few words for a single 4-gram: nothing to smooth
    log_sum = 0.0
    smoothing = 1.0
    for n in range(BLEU_ORDER):
        if matched[n] == 0:
            smoothing *= 2
            log_sum += math.log(1 / (smoothing * total[n]))
        else:
            log_sum += math.log(matched[n] / total[n])
    brevity = 1.0 if answer_length >= reference_length else math.exp(1 - reference_length / answer_length)
    return brevity * math.exp(log_sum / BLEU_ORDER)


def reference_scores(pairs: Sequence[tuple[str, str]]) -> ReferenceScores | None:
    """ROUGE-L and BLEU over (answer, reference answer) pairs; None when there is no pair."""
    if not pairs:
        return None
    answers, references = [a for a, _ in pairs], [r for _, r in pairs]
    return ReferenceScores(n=len(pairs), rouge_l=sum(rouge_l(a, r) for a, r in pairs) / len(pairs), bleu=corpus_bleu(answers, references))
