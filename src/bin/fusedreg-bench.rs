//! The main job: benchmarks fused kernels against the unfused way of doing the same work.
//!
//! For now it reports the device (or that there is none) and the device-to-device copy
//! bandwidth that every op's throughput is compared with.

use std::process::ExitCode;

use fusedreg::timing::{copy_bandwidth, TimingPlan};
use fusedreg::Handle;

fn main() -> ExitCode {
    let quick = std::env::args().any(|a| a == "--quick");
    println!(
        "fusedreg {} (kernels: {})",
        env!("CARGO_PKG_VERSION"),
        if fusedreg::kernels_built() {
            format!(
                "sm_{} + PTX, {}",
                fusedreg::compiled_archs()
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join("/sm_"),
                fusedreg::nvcc_version()
            )
        } else {
            "not built".to_string()
        }
    );
    let handle = match Handle::new(0) {
        Ok(h) => h,
        Err(e) => {
            println!("no CUDA device found: {e}");
            return ExitCode::SUCCESS;
        }
    };
    match run(&handle, quick) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(handle: &Handle, quick: bool) -> fusedreg::Result<()> {
    let info = handle.device_info()?;
    println!(
        "device {}: {} (sm_{}{}, {} SMs, {} MiB L2, {} GiB, driver {}.{})",
        info.ordinal,
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.sm_count,
        info.l2_bytes >> 20,
        info.total_memory >> 30,
        info.driver_version / 1000,
        (info.driver_version % 1000) / 10
    );
    let plan = if quick {
        TimingPlan::quick()
    } else {
        TimingPlan::default()
    };
    let bytes = 1u64 << 30;
    let bw = copy_bandwidth(handle, bytes, plan)?;
    println!(
        "device-to-device copy of {} MiB (bytes read + written): memcpy {:.0} GB/s, copy kernel {:.0} GB/s",
        bw.bytes >> 20,
        bw.memcpy_gbps,
        bw.kernel_gbps
    );
    Ok(())
}
