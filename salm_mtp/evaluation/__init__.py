"""Evaluation of a trained SALM model on a lhotse manifest: greedy hypotheses, WER/CER/BLEU, MTP agreement.

    salm-mtp evaluate --ckpt runs/demo/salm/version_0/checkpoints/last.ckpt \\
        --manifest data/demo/test_cuts.jsonl.gz --out runs/demo/eval [--decode greedy|mtp] [--batch-size 16]
    salm-mtp evaluate --model exports/demo --manifest ... --out ...
    salm-mtp evaluate --ckpt ... --manifest data/demo/talk_test.jsonl --out ...   # conversations / text (--type)

Settings come from the run itself: its resolved ``config.yaml`` (``<log_dir>/config.yaml`` for
``<log_dir>/checkpoints/x.ckpt``, ``EXPORT/config.yaml`` for an export, or ``--config FILE``) gives the
``data:`` section (prompt wording and template, bad-cut policy and bounds, ``max_duration``, ...), read
by salm_mtp.run_config with the parser of ``salm-mtp fit``; flags override it (``--manifest``, default
the run's ``data.test_manifest``; ``--batch-size`` = ``data.max_cuts``, default the run's or 16;
``--max-duration``, ``--num-workers``, ``--on-bad-cut``). Without a config a warning says that the
defaults are used. The tokenizer is the model's own, as in training (SALMModule hands it to the
datamodule). The loader is the training code's test loader (``SALMDataModule.test_dataloader``:
``DynamicCutSampler`` in manifest order, ``SALMDataset`` collation, the run's bad-cut checks).

Per batch:
  1. batched greedy decoding with the backbone's cache (salm_mtp.generate), timed;
  2. the MTP head's drafts along the model's own finished greedy answer (teacher-forced, one forward) ->
     per-depth marginal agreement (``mtp_teacher_forced_agreement``; eos counts as a token, padding does
     not) and the chained acceptance a self-speculative decoder would get along that answer (depth k
     counts only when 1..k-1 agree too: ``mtp_teacher_forced_chained_acceptance``) with
     ``teacher_forced_mean_accepted_length`` = 1 + sum_k chained_k;
  3. the main head's teacher-forced top-1 accuracy and cross-entropy on the reference answers (``main_acc``,
     ``main_loss``).
A conversation or text set (``--type conversations|text``, detected from the first line by default; the formats
of data.inputs, data/README.md) is read by the training code's reader (``SALMDataModule.source_dataloader``) with
one row per assistant turn: the reference history before the turn (its audio clips included) is the prompt, the
turn is generated and scored against its reference (``turn_wer``, ``turn_exact_match``), and teacher-forced
(``main_loss``, ``main_acc``; summed over turns, that is the loss of every assistant turn of the set). Rows are
``<conversation id>#<k>`` for the k-th assistant turn; a bad line follows data.on_bad_cut like a bad cut.
With ``--decode mtp`` step 1 also runs MTP self-speculative decoding (salm_mtp.decoding.speculative) on
the same prompts, greedy and MTP alternating which goes first from batch to batch; the hypotheses are
the MTP decoder's, and what it measured live is added under ``spec_*`` names.

Writes to ``--out``:
  hyps.jsonl    one object per manifest cut, in manifest order: {"id", "task", "ref", "hyp"} (+ "groups" when the
                cut carries supervision.custom["groups"]); a cut the data
                code left out (unreadable audio, empty text, too long, ...: salm_mtp.data.policy) has
                "hyp": null and "error": "<reason>: <detail>" (counted in num_failed; fatal only under
                on_bad_cut=raise). Written line by line as batches finish, rewritten in manifest order at the end.
  skipped_cuts.jsonl  the skipped cuts as the training run lists them (SkipLog)
  settings.json the data settings used (``data``: the DataConfig), where they came from (``run_config``: the
                config.yaml, or null for the defaults) and the prompts actually fed to the model, read back from
                the batches (``prompts``: text per task; ``prompt_ids``: their token ids)
  metrics.json  num_utterances (cuts evaluated, failed included), num_failed, skipped_cuts (count per reason),
                num_asr, num_ast, normalizer (applied before WER/CER: --normalizer), wer, wer_raw (raw text),
                wer_by_group ({"name=value": {num, wer, wer_raw, errors, ref_words}} for every group the asr cuts
                carry in supervision.custom["groups"], e.g. "text=unseen", "voice=unseen", "kind=numbers"),
                cer (over decoded asr cuts) with wer_errors, ref_words, cer_errors,
                ref_chars, num_empty_refs, num_empty_hyps (asr), bleu (over ast cuts; null if none),
                mtp_teacher_forced_agreement (marginal, one value per depth; [] without a head),
                mtp_teacher_forced_chained_acceptance, teacher_forced_mean_accepted_length (tokens per backbone
                forward; null without a head), main_acc, main_loss (nats per answer token), num_turns, turn_wer,
                turn_exact_match (conversation / text rows; null without any), generated_tokens, decode_seconds (prompt encoding +
                prefill + decode steps only), tokens_per_s, max_new_tokens, decode ("greedy" | "mtp"). Undefined
                values (nan/inf) are written as null. The teacher-forced figures are offline: measured along the
                finished greedy answer. --decode mtp adds what the speculative decoder measured live:
                spec_num_drafts, spec_tokens_per_forward (emitted tokens / verification forwards),
                spec_chained_acceptance (per depth), spec_mean_accepted_length (1 + their sum),
                spec_row_forwards / greedy_row_forwards (backbone forwards summed over rows, prefills
                included), greedy_decode_seconds / spec_decode_seconds (decoding the same encoded
                prompts), spec_speedup (their ratio), spec_identical_to_greedy, spec_mismatched_rows;
                decode_seconds then covers prompt encoding + the MTP decode.
  report.png    teacher-forced agreement bars + training curves of --metrics-csv (default: the metrics.csv
                that Lightning's CSVLogger wrote next to the checkpoint's run dir, if any)

Modules: data (model and manifest in), decode (one batch), score (metrics.json), report (the table), run
(``evaluate``: the whole evaluation), cli (``salm-mtp evaluate``).
"""
