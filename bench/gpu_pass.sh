#!/usr/bin/env bash
# One device call of the GPU check-and-measure pass (the device tool runs it from the repo root).
#   bash bench/gpu_pass.sh A   # GPU tests, kernels, KV transports (handoff GB/s, TTFT per
#                              # transport), the decode server's token path (CPU model, 16 cores)
#   bash bench/gpu_pass.sh B   # W1 via the gateway + HF static peer, W2 both modes, control plane
#   bash bench/gpu_pass.sh C   # KV transports, W2 both modes and the token path again
#   bash bench/gpu_pass.sh D   # async scheduling: GPU test, engine step + W1 engine-only, W1 stack
#   bash bench/gpu_pass.sh E   # W1 via the gateway with async scheduling on and off + HF peer
#   bash bench/gpu_pass.sh F   # W1 via the gateway under py-spy (decode phase, every process)
#   bash bench/gpu_pass.sh K   # Decode.Session: W1 at stream interval 1 and 4 + HF static peer,
#                              # decode token path, control plane lockstep/coalesce
#   bash bench/gpu_pass.sh L   # where a step's time goes: kernel profile (decode 256/512,
#                              # prefill 8k), decode host share, W1 engine-only; W2 both modes
#   bash bench/gpu_pass.sh M   # mixed steps' decode rows through the decode kernel: GPU tests,
#                              # mixed-step profile + W1 engine-only split/unsplit, host share,
#                              # W1 via the gateway + HF static peer
#   bash bench/gpu_pass.sh N   # M in the device time one session has left (~12 min): GPU tests,
#                              # W1 via the gateway + HF static peer, engine-only split/unsplit
#   bash bench/gpu_pass.sh R   # W1 via 2 gateways + 2 routers, 4 + 2, 1 + 1 (4 clients each), HF
#                              # static peer, engine-only W1
#   bash bench/gpu_pass.sh T   # control plane 1+1 vs 2+2 front ends; W1 g2r2 under py-spy
#   bash bench/gpu_pass.sh U   # leaner decode host path: GPU tests, decode host share new / old
#                              # (.carry/old/tandem: the files before) / new, kernel profile at
#                              # batch 512, W1 engine-only x2; W1 via 2 + 2 with the HF peer
#   bash bench/gpu_pass.sh V   # decode host share only: old / new / old / new, 200 steps each
#   bash bench/gpu_pass.sh W   # can K/V reads overlap the GEMMs? bench/overlap_probe.py
#   bash bench/gpu_pass.sh X   # W2 both modes on the final code
#   bash bench/gpu_pass.sh S   # the trust boundary: GPU tests (the capability-checked cuda_ipc
#                              # handoff, engine recovery), KV transports with serving
#   bash bench/gpu_pass.sh S2  # control plane without and with mutual TLS (lockstep and
#                              # coalescing fake decode servers), 16 cores
#   bash bench/gpu_pass.sh SO  # structured outputs: GPU tests, W1 via the gateway plain and
#                              # with a JSON schema on every request, in turn
#   bash bench/gpu_pass.sh Y   # after the floors redesign: GPU tests, then W1 engine-only on the
#                              # core before it (.carry/old: tandem/ and bench/gpu_engine.py of
#                              # the commit before) and after, in turn, 2 runs each
# Needs .carry/ (whl/, gpu_ceilings.py, hf_peers.py, smollm2-tokenizer/: see docs/benchmarks.md).
# Every step has its own time limit and a failed step does not stop the next. Raw results go to
# $OUT/raw/ and come back as $OUT/raw.tar.gz (at most 8 files come back), beside their summaries
# in $OUT (bench/summarize.py): a summary goes to bench/results/NAME and its raw file (unpacked)
# to bench/results/raw/NAME (git-ignored), NAME the same for both (e.g. w1-gateway-h200-DATE.json).
set -u
export PYTHONUNBUFFERED=1
RAW="$OUT/raw"
mkdir -p "$RAW"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .carry/whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || {
  python3 -c "from protos import build; build.generate()"  # the generated gRPC code
  ln -sfn "$PWD/kernels" /tmp/site/tandem_kernels  # setup.py installs kernels/ under this name
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 bench/dummy_model_dir.py --config tandem/configs/llama-3.1-8b \
  --tokenizer-from .carry/smollm2-tokenizer --out /tmp/tandem-dummy-model >/dev/null
step() { local t=$1; shift; echo "=== $* (limit ${t}s)"; timeout "$t" "$@" || echo "=== step failed rc=$?"; }
case "${1:-A}" in
A)
  step 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/kvtransfer 2>&1 | tail -4
  step 90 python3 -m bench.kernels_bench --out "$RAW/kernels.json" 2>&1 | grep -v "^sweep"
  step 300 python3 bench/gpu_kv_transport.py --out "$RAW/kv-transport.json" --time-budget-s 270 \
    --tokenizer-from .carry/smollm2-tokenizer 2>&1 | tail -40
  step 60 python3 bench/decode_token_path.py --streams 512 --out "$RAW/decode-token-path.json" \
    2>&1 | tail -6
  ;;
B)
  step 200 python3 -m bench.gpu_serving w1 --out "$RAW" --peers .carry/hf_peers.py \
    --peer-kinds static --ceilings .carry/gpu_ceilings.py 2>&1 | grep -E "^(CEILINGS|W1)|tok/s" | tail -8
  step 230 python3 -m bench.gpu_serving w2 --out "$RAW" --rates 2,8,16,32 --seconds-per-rate 10 \
    2>&1 | grep -E "^W2" | cut -c1-400
  step 120 python3 -m bench.control_plane --model /tmp/tandem-dummy-model --num-clients 4 \
    --modes lockstep,coalesce --repeats 1 --out "$RAW/control-plane.json" 2>&1 | tail -12
  ;;
C)  # the reruns after the Triton block copy: KV transports, W2 both modes, token path
  step 200 python3 bench/gpu_kv_transport.py --out "$RAW/kv-transport.json" --time-budget-s 150 \
    --tokenizer-from .carry/smollm2-tokenizer 2>&1 | grep -E "^(BW|SERVE)"
  step 240 python3 -m bench.gpu_serving w2 --out "$RAW" --rates 2,8,16,32 --seconds-per-rate 8 \
    2>&1 | grep -E "^W2" | cut -c1-60
  python3 -m bench.w2_table "$RAW/w2.json"
  step 60 python3 bench/decode_token_path.py --streams 512 --out "$RAW/decode-token-path.json" \
    2>&1 | tail -4
  rm -f "$RAW"/serve-*.log  # at most 8 files come back
  ;;
D)  # async scheduling: GPU equality test, engine step and W1 engine-only, W1 via the gateway
  step 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/core/test_async_scheduling_gpu.py \
    2>&1 | tail -15
  step 240 python3 bench/gpu_engine.py --ceilings .carry/gpu_ceilings.py --out "$RAW/engine.json" \
    2>&1 | grep -v "^sweep" | tail -45
  step 180 python3 -m bench.gpu_serving w1 --out "$RAW" 2>&1 | grep -E "^(CEILINGS|W1)" | cut -c1-900
  tail -5 "$RAW"/serve-w1.log; rm -f "$RAW"/serve-*.log
  ;;
E)  # W1 via the gateway, async scheduling on and off, with the HF static peer in the same call
  step 200 python3 -m bench.gpu_serving w1 --out "$RAW" --peers .carry/hf_peers.py \
    --peer-kinds static 2>&1 | grep -E "^(CEILINGS|W1)|tok/s" | cut -c1-900 | tail -8
  step 150 python3 -m bench.gpu_serving w1 --out "$RAW" --serve-extra=--no-async-scheduling \
    --tag=-sync 2>&1 | grep -E "^W1" | cut -c1-900
  rm -f "$RAW"/serve-*.log
  ;;
G)  # after the host-path changes: GPU test, engine step + W1 engine-only, W1 stack at
    # stream interval 1 and 4
  step 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/core/test_async_scheduling_gpu.py \
    2>&1 | tail -3
  step 200 python3 bench/gpu_engine.py --ceilings .carry/gpu_ceilings.py --out "$RAW/engine.json" \
    2>&1 | grep -v "^sweep" | grep -E '^\{|function calls|engine.py|scheduler.py|graphs.py|runner.py'
  step 150 python3 -m bench.gpu_serving w1 --out "$RAW" 2>&1 | grep -E "^W1" | cut -c1-700
  step 150 python3 -m bench.gpu_serving w1 --out "$RAW" --serve-extra="--stream-interval 4" \
    --tag=-si4 2>&1 | grep -E "^W1" | cut -c1-700
  rm -f "$RAW"/serve-*.log
  ;;
F)  # where the stack's time goes in W1: py-spy of every server process in the decode phase
  export PATH=/tmp/site/bin:$PATH
  step 200 python3 bench/gpu_w1_profile.py --out "$RAW" 2>&1 | tail -150
  rm -f "$RAW"/pyspy-*-gil.txt
  ;;
I)  # final: W1 at stream interval 1 with the HF static peer, W1 at stream interval 4, W2
  step 200 python3 -m bench.gpu_serving w1 --out "$RAW" --peers .carry/hf_peers.py \
    --peer-kinds static 2>&1 | grep -E "^(CEILINGS|W1)|tok/s" | cut -c1-600 | tail -8
  step 100 python3 -m bench.gpu_serving w1 --out "$RAW" --serve-extra="--stream-interval 4" \
    --tag=-si4 2>&1 | grep -E "^W1" | cut -c1-600
  rm -f "$RAW"/serve-*.log
  step 200 python3 -m bench.gpu_serving w2 --out "$RAW" --rates 2,8,16,32 --seconds-per-rate 6 \
    2>&1 | grep -E "^W2" | cut -c1-60
  python3 -m bench.w2_table "$RAW/w2.json"
  rm -f "$RAW"/serve-*.log
  ;;
J)  # after the bench client fix: W1 at stream interval 4 and 1, then the HF static peer
  step 100 python3 -m bench.gpu_serving w1 --out "$RAW" --serve-extra="--stream-interval 4" \
    --tag=-si4 2>&1 | grep -E "^W1" | cut -c1-500
  step 100 python3 -m bench.gpu_serving w1 --out "$RAW" 2>&1 | grep -E "^W1" | cut -c1-500
  rm -f "$RAW"/serve-*.log
  step 120 python3 .carry/hf_peers.py --requests 512 --peers static > "$RAW/hf-peers.txt" 2>&1
  tail -2 "$RAW/hf-peers.txt"
  ;;
H)  # final W1 pair with the HF static peer in the same call, then the end-of-run stall under
    # py-spy (every server process and the client, stream interval 4)
  export PATH=/tmp/site/bin:$PATH
  step 200 python3 -m bench.gpu_serving w1 --out "$RAW" --peers .carry/hf_peers.py \
    --peer-kinds static 2>&1 | grep -E "^(CEILINGS|W1)|tok/s" | cut -c1-700 | tail -8
  step 150 python3 bench/gpu_w1_profile.py --out "$RAW" --serve-extra="--stream-interval 4" \
    --at-s 13 --seconds 6 2>&1 | grep -v "^\(Mean\|Median\|P90\|P99\|Total\|Request\)" | tail -120
  rm -f "$RAW"/serve-*.log "$RAW"/pyspy-*-gil.txt
  ;;
K)  # after Decode.Session (session 5): W1 at interval 1 and 4 with the HF static peer in the
    # same call, the decode token path and the control plane (Session is the only decode path
    # since Decode.Generate went; the fake decode's coalescing clock is mode "coalesce")
  step 200 python3 -m bench.gpu_serving w1 --out "$RAW" --peers .carry/hf_peers.py \
    --peer-kinds static 2>&1 | grep -E "^(CEILINGS|W1)|tok/s" | cut -c1-700 | tail -8
  step 100 python3 -m bench.gpu_serving w1 --out "$RAW" --serve-extra="--stream-interval 4" \
    --tag=-si4 2>&1 | grep -E "^W1" | cut -c1-500
  rm -f "$RAW"/serve-*.log
  step 60 python3 bench/decode_token_path.py --streams 512 --out "$RAW/decode-token-path.json" \
    2>&1 | grep '^{"'
  step 170 python3 -m bench.control_plane --model /tmp/tandem-dummy-model --num-clients 4 \
    --modes lockstep,coalesce --itl-ms 20 --num-prompts 512 --output-len 256 --repeats 1 \
    --out "$RAW/control-plane-session.json" 2>&1 | grep -E "^(run|mode|\{)"
  ;;
L)  # session 6: kernel profile + host share + W1 engine-only, then W2 both modes (sessions)
  step 280 python3 bench/gpu_engine.py --ceilings .carry/gpu_ceilings.py --kernel-profile \
    --out "$RAW/engine.json" 2>&1 | grep -v "^sweep" | grep -vE "^(KERNELS|USDT)" | cut -c1-1500
  python3 -c "import json,sys; k=json.load(open(sys.argv[1]))['kernel_profile']
for n,d in k['decode'].items():
  for m,v in d.items(): print('KP', n, m, round(v['gpu_ms_per_step'],2), v['by_kind_ms_per_step'])
print('KP prefill', round(k['prefill']['gpu_ms_per_step'],1), k['prefill']['by_kind_ms_per_step'])" \
    "$RAW/engine.json"
  step 230 python3 -m bench.gpu_serving w2 --out "$RAW" --rates 2,8,16,32 --seconds-per-rate 8 \
    2>&1 | grep -E "^W2" | cut -c1-60
  python3 -m bench.w2_table "$RAW/w2.json"
  rm -f "$RAW"/serve-*.log
  ;;
M)  # session 6: the mixed-step split, measured and checked
  step 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/core/test_mixed_step_attention.py \
    tests/core/test_async_scheduling_gpu.py 2>&1 | tail -3
  step 200 python3 bench/gpu_engine.py --ceilings .carry/gpu_ceilings.py --kernel-profile \
    --kernel-profile-batches 256 --w1-unsplit --profile-steps 60 --out "$RAW/engine.json" 2>&1 | \
    grep -vE "^(sweep|KERNELS|USDT| )" | grep -v "^$" | cut -c1-900 | head -20
  python3 -c "import json,sys; k=json.load(open(sys.argv[1]))['kernel_profile']['mixed']
for m in ('split','one_prefill_call'):
  v=k[m]; print('MIXED', m, round(v['gpu_ms_per_step'],1), round(v['step_wall_ms_unprofiled'],1), v['by_kind_ms_per_step'])" \
    "$RAW/engine.json"
  step 200 python3 -m bench.gpu_serving w1 --out "$RAW" --peers .carry/hf_peers.py \
    --peer-kinds static 2>&1 | grep -E "^(CEILINGS|W1)|tok/s" | cut -c1-600 | tail -8
  rm -f "$RAW"/serve-*.log
  ;;
N)  # session 7: the mixed-step split checked on the GPU, W1 through the stack, engine A/B
  step 130 python3 -m pytest -q -m gpu -p no:cacheprovider tests/core/test_mixed_step_attention.py \
    tests/core/test_async_scheduling_gpu.py tests/kernels 2>&1 | tail -3
  step 230 python3 -m bench.gpu_serving w1 --out "$RAW" --peers .carry/hf_peers.py \
    --peer-kinds static 2>&1 | grep -E "^(CEILINGS|W1)|tok/s" | cut -c1-600 | tail -8
  rm -f "$RAW"/serve-*.log
  step 170 python3 bench/gpu_engine.py --ceilings .carry/gpu_ceilings.py --kernel-profile \
    --kernel-profile-batches 256 --skip-steady --w1-unsplit --out "$RAW/engine.json" 2>&1 | \
    grep -vE "^(sweep|KERNELS|USDT| )" | grep -v "^$" | cut -c1-700 | head -12
  python3 -c "import json,sys; k=json.load(open(sys.argv[1]))['kernel_profile']['mixed']
for m in ('split','one_prefill_call'):
  v=k[m]; print('MIXED', m, round(v['gpu_ms_per_step'],1), round(v['step_wall_ms_unprofiled'],1), v['by_kind_ms_per_step'])" \
    "$RAW/engine.json"
  ;;
O)  # session 7: the engine-only A/B with new prompts per run, W1 via the gateway again
  step 150 python3 bench/gpu_engine.py --ceilings .carry/gpu_ceilings.py --skip-steady \
    --w1-unsplit --out "$RAW/engine-ab.json" 2>&1 | grep -E "^(CEILINGS|UNSPLIT|SPLIT2|\{\"req)" | \
    cut -c1-420
  step 120 python3 -m bench.gpu_serving w1 --out "$RAW" --tag=-again 2>&1 | grep -E "^W1" | \
    cut -c1-600
  rm -f "$RAW"/serve-*.log
  ;;
P)  # session 7: a cold start with the kernel warm-up, W1 twice (first burst vs warm)
  export TRITON_CACHE_DIR=/tmp/triton-cold && rm -rf "$TRITON_CACHE_DIR"
  step 160 python3 bench/gpu_engine.py --ceilings .carry/gpu_ceilings.py --skip-steady \
    --w1-repeats 2 --out "$RAW/engine-cold.json" 2>&1 | grep -E "^(Traceback|[A-Za-z]*Error)" | head
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('START', d['startup_s'], d['triton_cache_entries_after_startup'])
for k in ('w1_engine','w1_engine_repeat1'):
  v=d[k]; print('W1', k, round(v['output_tok_s']), round(v['seconds'],2), round(v['prefill_or_mixed_s'],2), v['triton_cache_entries_after'], [(r['batch'],r['tokens'],round(r['wall_s'],3)) for r in v['slowest_steps']])" \
    "$RAW/engine-cold.json"
  ;;
Q)  # W1 through the gateway, 4 client processes against 1, HF static peer in the same call
  step 200 python3 -m bench.gpu_serving w1 --out "$RAW" --num-clients 4 --tag=-4clients \
    --peers .carry/hf_peers.py --peer-kinds static 2>&1 | grep -E "^(CEILINGS|W1)|tok/s" | \
    cut -c1-700 | tail -8
  step 120 python3 -m bench.gpu_serving w1 --out "$RAW" --tag=-1client 2>&1 | grep -E "^W1" | \
    cut -c1-700
  rm -f "$RAW"/serve-*.log
  ;;
R)  # session 8: W1 through 2 gateways + 2 routers (4 clients) with the HF static peer, other
    # front-end counts, one gateway + one router again, and the engine alone, all in one call
  step 200 python3 -m bench.gpu_serving w1 --out "$RAW" --num-clients 4 --tag=-g2r2 \
    --serve-extra="--gateways 2 --routers 2" --peers .carry/hf_peers.py --peer-kinds static \
    --ceilings .carry/gpu_ceilings.py 2>&1 | grep -E "^(CEILINGS|W1)|tok/s" | cut -c1-700 | tail -8
  step 100 python3 -m bench.gpu_serving w1 --out "$RAW" --num-clients 4 --tag=-g4r2 \
    --serve-extra="--gateways 4 --routers 2" 2>&1 | grep -E "^W1" | cut -c1-500
  step 100 python3 -m bench.gpu_serving w1 --out "$RAW" --num-clients 4 --tag=-g1r1 2>&1 | \
    grep -E "^W1" | cut -c1-500
  rm -f "$RAW"/serve-*.log
  step 150 python3 bench/gpu_engine.py --ceilings .carry/gpu_ceilings.py --skip-steady \
    --out "$RAW/engine.json" 2>&1 | grep -E "^(CEILINGS|\{\"req)" | cut -c1-420
  ;;
T)  # session 8: the control plane (fake engine, 10 ms steps, Decode.Session) with one router and
    # gateway against two of each; then W1 via 2 gateways + 2 routers under py-spy
  for fe in 1 2; do
    step 150 python3 -m bench.control_plane --model /tmp/tandem-dummy-model --num-clients 4 \
      --modes coalesce --itl-ms 10 --num-prompts 512 --output-len 256 --repeats 1 \
      --num-routers $fe --num-gateways $fe --out "$RAW/control-plane-r${fe}g${fe}.json" 2>&1 | \
      grep -E "^(run|\{)" | cut -c1-400
  done
  export PATH=/tmp/site/bin:$PATH
  step 200 python3 bench/gpu_w1_profile.py --out "$RAW" --serve-extra="--gateways 2 --routers 2" \
    2>&1 | grep -E "^(==|  thread|\{)|^ +[0-9]+ " | cut -c1-200 | head -90
  rm -f "$RAW"/pyspy-*.txt
  ;;
U)  # session 9: the decode loop's host work, before and after, in one call
  pat='^(CEILINGS|\{|REPEAT)|function calls|engine.py|scheduler.py|graphs.py|runner.py|sampler.py'
  [ -n "${SKIP_TESTS:-}" ] || step 200 python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/core/test_async_scheduling_gpu.py tests/core/test_mixed_step_attention.py 2>&1 | tail -3
  step 150 python3 bench/gpu_engine.py --ceilings .carry/gpu_ceilings.py --skip-w1 \
    --out "$RAW/engine-host-new1.json" 2>&1 | grep -E "$pat" | cut -c1-1500
  if [ -z "${SKIP_OLD:-}" ]; then
    rm -rf /tmp/old && mkdir /tmp/old && cp -r tandem bench /tmp/old/ && cp .carry/old/tandem/*.py /tmp/old/tandem/
    (cd /tmp/old && export PYTHONPATH=/tmp/site:/tmp/old && step 150 python3 bench/gpu_engine.py \
      --ceilings "$OLDPWD/.carry/gpu_ceilings.py" --skip-w1 --out "$RAW/engine-host-old.json" 2>&1 | \
      grep -E "$pat" | cut -c1-1500)
  fi
  step 300 python3 bench/gpu_engine.py --ceilings .carry/gpu_ceilings.py --kernel-profile \
    --kernel-profile-batches 512 --w1-repeats 2 --out "$RAW/engine-host-new2.json" 2>&1 | \
    grep -E "$pat" | cut -c1-1500
  [ -n "${SKIP_STACK:-}" ] || step 200 python3 -m bench.gpu_serving w1 --out "$RAW" --num-clients 4 \
    --tag=-g2r2 --serve-extra="--gateways 2 --routers 2" --ceilings .carry/gpu_ceilings.py 2>&1 | \
    grep -E "^(CEILINGS|W1)" | cut -c1-700
  step 150 python3 .carry/hf_peers.py --requests 512 --peers static > "$RAW/hf-peers.txt" 2>&1
  tail -2 "$RAW/hf-peers.txt"
  rm -f "$RAW"/serve-*.log
  ;;
V)  # session 9: the decode host share, files before (.carry/old/tandem) and after, in turn
  rm -rf /tmp/old && mkdir /tmp/old && cp -r tandem bench /tmp/old/ && cp .carry/old/tandem/*.py /tmp/old/tandem/
  for i in 1 2; do
    for v in old new; do
      dir=$PWD; [ $v = old ] && dir=/tmp/old
      (cd $dir && export PYTHONPATH=/tmp/site:$dir && step 150 python3 bench/gpu_engine.py \
        --ceilings "$OLDPWD/.carry/gpu_ceilings.py" --skip-w1 --profile-steps 200 \
        --out "$RAW/engine-host-$v$i.json" 2>&1 | grep -E '^\{"batch' | cut -c1-900)
    done
  done
  ;;
W)  # session 9: an upper bound for overlapping a decode step's attention with its GEMMs
  step 240 python3 bench/overlap_probe.py --out "$RAW/overlap-probe.json" 2>&1 | grep -E "^\{|Error" | cut -c1-700
  ;;
X)  # session 9: W2 (four Poisson rates, aggregated and disaggregated) on the final code
  step 300 python3 -m bench.gpu_serving w2 --out "$RAW" --rates 2,8,16,32 --seconds-per-rate 8 \
    2>&1 | grep -E "^W2" | cut -c1-60
  python3 -m bench.w2_table "$RAW/w2.json"
  rm -f "$RAW"/serve-*.log
  ;;
Y)  # the floors redesign moved the runner's input preparation, tables and graphs apart: same
    # tokens on the GPU (tests), and the same speed as the core before it in the same call
  step 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/core tests/kernels \
    tests/kvtransfer 2>&1 | tail -6
  rm -rf /tmp/old && mkdir -p /tmp/old/bench && cp -r .carry/old/tandem /tmp/old/ \
    && cp .carry/old/gpu_engine.py /tmp/old/bench/
  for v in new old; do
    dir=$PWD; [ $v = old ] && dir=/tmp/old
    (cd $dir && export PYTHONPATH=/tmp/site:$dir && step 180 python3 bench/gpu_engine.py \
      --ceilings "$OLDPWD/.carry/gpu_ceilings.py" \
      --skip-steady --w1-repeats 2 --out "$RAW/engine-w1-$v.json" 2>&1 | \
      grep -E '^(CEILINGS|\{"slowest|\{"gpu)' | cut -c1-700)
  done
  ;;
Z0)  # handoff GB/s only (no serving), the tree before the kvtransfer rewrite (.carry/oldrepo)
    # and after, in turn, on the same GPU
  (cd .carry/oldrepo && PYTHONPATH=/tmp/site:$PWD python3 -c "from protos import build; build.generate()")
  for v in old new old new; do
    dir=$PWD; [ $v = old ] && dir=$PWD/.carry/oldrepo
    (cd $dir && PYTHONPATH=/tmp/site:$dir step 100 python3 bench/gpu_kv_transport.py --no-serve \
      --out "$RAW/kv-bw-$v.json" 2>&1 | grep "^BW" | sed "s/^/$v /")
  done
  ;;
Z)  # the KV transports after the one-interface rewrite (one Transfer call for every transport)
  step 230 python3 bench/gpu_kv_transport.py --out "$RAW/kv-transport.json" --time-budget-s 200 \
    --tokenizer-from .carry/smollm2-tokenizer 2>&1 | tail -30
  ;;
S)  # the internal trust boundary: capability-checked handoffs on the GPU
  step 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/kvtransfer \
    tests/core 2>&1 | tail -8
  step 200 python3 bench/gpu_kv_transport.py --out "$RAW/kv-transport.json" --time-budget-s 170 \
    --tokenizer-from .carry/smollm2-tokenizer 2>&1 | grep -E "^(BW|SERVE)"
  ;;
S0)  # handoff GB/s only, the tree before the capability checks (.carry/base) and after, in
    # turn, on the same GPU; then the handoffs with serving on the new tree
  (cd .carry/base && PYTHONPATH=/tmp/site:$PWD python3 -c "from protos import build; build.generate()")
  for v in old new old new; do
    dir=$PWD; [ $v = old ] && dir=$(cd .carry/base && pwd)
    (cd $dir && PYTHONPATH=/tmp/site:$dir step 100 python3 bench/gpu_kv_transport.py --no-serve \
      --out "$RAW/kv-bw-$v.json" 2>&1 | grep "^BW" | sed "s/^/$v /")
  done
  step 200 python3 bench/gpu_kv_transport.py --out "$RAW/kv-transport.json" --time-budget-s 170 \
    --tokenizer-from .carry/smollm2-tokenizer 2>&1 | grep -E "^(BW|SERVE)"
  ;;
S2)  # what mutual TLS and the per-RPC role checks cost on the token path (same call, machine)
  for m in lockstep coalesce; do
    extra=(); [ $m = coalesce ] && extra=(--worker-coalesce)
    step 280 python3 -m bench.control_plane --model /tmp/tandem-dummy-model --num-clients 4 \
      "${extra[@]}" --modes plaintext,mtls --repeats 2 --note "fake decode: $m" \
      --out "$RAW/control-plane-mtls-$m.json" 2>&1 | grep -E "^(mode|run|\{)"
  done
  ;;
SO)  # structured outputs: GPU tests (masks under async scheduling), then W1 via the gateway
    # unconstrained and with a JSON schema on every request, in turn, same call; `SO 2`: the
    # W1 runs only, in the other order
  [ "${2:-1}" = 1 ] && step 120 python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/core/test_structured_gpu.py tests/core/test_async_scheduling_gpu.py 2>&1 | tail -4
  schema='{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"},'
  schema+='"tags":{"type":"array","items":{"type":"string"}}},"required":["name","age","tags"]}'
  body="{\"structured_outputs\": {\"json\": $schema}}"
  order="plain json plain"; [ "${2:-1}" = 2 ] && order="json plain json"
  i=0
  for t in $order; do
    extra=(); [ $t = json ] && extra=(--bench-extra "$body")
    i=$((i + 1))
    step 130 python3 -m bench.gpu_serving w1 --out "$RAW" --tag "-$t-${2:-1}$i" "${extra[@]}" \
      2>&1 | grep -E "^W1" | cut -c1-600
  done
  ;;
esac
shopt -s nullglob
# results get summaries; logs and py-spy dumps travel in the archive only
meta=(--meta gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)")
meta+=(--meta command="bash bench/gpu_pass.sh ${1:-A}")
commit=$(git describe --always --dirty 2>/dev/null) && meta+=(--meta commit="$commit")
python3 -m bench.summarize "$RAW"/*.json "$RAW"/hf-peers*.txt --out-dir "$OUT" "${meta[@]}"
tar -czf "$OUT/raw.tar.gz" -C "$OUT" raw && rm -r "$RAW"
ls -la "$OUT"
