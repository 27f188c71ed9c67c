//! Which GPU an agent runs on, as NVML describes it, and how NVML's view is tied to CUDA's.
//!
//! Every result row carries the device identity; CUDA gives the compute-side facts (name, SM count,
//! memory), NVML adds what only the management library knows (serial, VBIOS, power limit, ECC and
//! MIG modes, driver version). NVML and CUDA number GPUs differently (NVML ignores
//! `CUDA_VISIBLE_DEVICES` and `CUDA_DEVICE_ORDER`), so the two are matched by PCI bus id or UUID,
//! never by ordinal.

use std::fmt;
use std::str::FromStr;

use decodebench_kernels::DeviceIdentity;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};

use crate::telemetry::TelemetryError;

/// `nvmlDeviceGetMigMode`'s value for "MIG enabled" (`NVML_DEVICE_MIG_ENABLE`).
const NVML_MIG_ENABLED: u32 = 1;
/// Milliwatts per watt, for NVML's power limits (reported in mW).
const MILLIWATTS_PER_WATT: f64 = 1000.0;

/// How a GPU is named to NVML.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DeviceSelector {
    /// NVML's own index (not the CUDA ordinal; see the module docs).
    Index(u32),
    /// `GPU-xxxxxxxx-...` (or a bare 32-hex-digit UUID), or `MIG-...` for a MIG instance.
    Uuid(String),
    /// `domain:bus:device.function`, in NVML's (`00000000:1B:00.0`) or CUDA's (`0000:1b:00.0`)
    /// spelling.
    PciBusId(String),
}

impl fmt::Display for DeviceSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSelector::Index(index) => write!(f, "{index}"),
            DeviceSelector::Uuid(uuid) => f.write_str(uuid),
            DeviceSelector::PciBusId(bus_id) => f.write_str(bus_id),
        }
    }
}

impl FromStr for DeviceSelector {
    type Err = TelemetryError;

    /// `0` -> index, `GPU-...`/`MIG-...`/32 hex digits -> UUID, `0000:1b:00.0` -> PCI bus id.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let text = input.trim();
        if let Ok(index) = text.parse::<u32>() {
            return Ok(DeviceSelector::Index(index));
        }
        if normalize_gpu_uuid(text).is_some() {
            return Ok(DeviceSelector::Uuid(text.to_string()));
        }
        if PciAddress::parse(text).is_some() {
            return Ok(DeviceSelector::PciBusId(text.to_string()));
        }
        Err(TelemetryError::InvalidSelector {
            input: input.to_string(),
        })
    }
}

impl DeviceSelector {
    /// The NVML selector for a device CUDA has already described: its PCI bus id, else its UUID.
    /// `None` when CUDA gave neither (then only the NVML index is left, which may name another
    /// GPU when `CUDA_VISIBLE_DEVICES` reorders or hides devices).
    pub fn for_cuda_device(identity: &DeviceIdentity) -> Option<DeviceSelector> {
        if let Some(bus_id) = identity
            .pci_bus_id
            .as_deref()
            .filter(|b| PciAddress::parse(b).is_some())
        {
            return Some(DeviceSelector::PciBusId(bus_id.to_string()));
        }
        normalize_gpu_uuid(&identity.uuid).map(|_| DeviceSelector::Uuid(identity.uuid.clone()))
    }
}

/// A PCI address compared by value, so NVML's `00000000:1B:00.0` equals CUDA's `0000:1b:00.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PciAddress {
    pub domain: u32,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl PciAddress {
    /// Parses `[domain:]bus:device.function` (hex fields, any case). `None` when it is not one.
    pub fn parse(text: &str) -> Option<PciAddress> {
        let text = text.trim();
        let (head, function) = text.rsplit_once('.')?;
        let mut parts = head.rsplitn(3, ':');
        let device = parts.next()?;
        let bus = parts.next()?;
        let domain = parts.next().unwrap_or("0");
        // Bounded lengths keep `0100` from passing as bus 0x00 after truncation.
        let hex_field = |s: &str, max_len: usize| -> Option<u32> {
            if s.is_empty() || s.len() > max_len || !s.chars().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            u32::from_str_radix(s, 16).ok()
        };
        Some(PciAddress {
            domain: hex_field(domain, 8)?,
            bus: u8::try_from(hex_field(bus, 2)?).ok()?,
            device: u8::try_from(hex_field(device, 2)?).ok()?,
            function: u8::try_from(hex_field(function, 1)?).ok()?,
        })
    }
}

impl fmt::Display for PciAddress {
    /// CUDA's spelling (`0000:1b:00.0`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// A GPU UUID reduced to a comparable form: lowercase hex digits without dashes, with `mig-` kept
/// in front for MIG instances (so a MIG instance never matches its parent GPU). Accepts
/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (NVML, nvidia-smi) and the bare 32 hex digits some
/// CUDA bindings print. `None` when it is not a UUID.
pub fn normalize_gpu_uuid(text: &str) -> Option<String> {
    let text = text.trim();
    let (prefix, body) = match text.get(..4) {
        Some(p) if p.eq_ignore_ascii_case("GPU-") => ("", &text[4..]),
        Some(p) if p.eq_ignore_ascii_case("MIG-") => ("mig-", &text[4..]),
        _ => ("", text),
    };
    let digits: String = body
        .chars()
        .filter(|c| *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (digits.len() == 32 && digits.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| format!("{prefix}{digits}"))
}

fn nvml_device_count_of(nvml: &Nvml) -> Result<u32, TelemetryError> {
    nvml.device_count().map_err(|source| TelemetryError::Query {
        what: "device_count",
        source,
    })
}

/// Opens the GPU `selector` names. UUIDs and PCI bus ids are matched by value over all devices, so
/// either spelling works.
pub(crate) fn resolve_device<'n>(
    nvml: &'n Nvml,
    selector: &DeviceSelector,
) -> Result<Device<'n>, TelemetryError> {
    let open_error = |source| TelemetryError::DeviceOpen {
        selector: selector.clone(),
        source,
    };
    let count = nvml_device_count_of(nvml)?;
    let not_found = || TelemetryError::DeviceNotFound {
        selector: selector.clone(),
        count,
    };
    match selector {
        DeviceSelector::Index(index) => {
            if *index >= count {
                return Err(not_found());
            }
            nvml.device_by_index(*index).map_err(open_error)
        }
        DeviceSelector::Uuid(uuid) => {
            // NVML's own lookup handles its spelling and MIG instances; the scan handles others.
            if let Ok(device) = nvml.device_by_uuid(uuid.as_str()) {
                return Ok(device);
            }
            let wanted = normalize_gpu_uuid(uuid).ok_or_else(not_found)?;
            find_device(nvml, count, |device| {
                device
                    .uuid()
                    .ok()
                    .and_then(|u| normalize_gpu_uuid(&u))
                    .is_some_and(|u| u == wanted)
            })
            .ok_or_else(not_found)
        }
        DeviceSelector::PciBusId(bus_id) => {
            let wanted = PciAddress::parse(bus_id).ok_or_else(not_found)?;
            find_device(nvml, count, |device| {
                device
                    .pci_info()
                    .ok()
                    .and_then(|pci| PciAddress::parse(&pci.bus_id))
                    .is_some_and(|address| address == wanted)
            })
            .ok_or_else(not_found)
        }
    }
}

fn find_device<'n>(
    nvml: &'n Nvml,
    count: u32,
    matches: impl Fn(&Device<'n>) -> bool,
) -> Option<Device<'n>> {
    (0..count)
        .filter_map(|index| nvml.device_by_index(index).ok())
        .find(|device| matches(device))
}

/// What NVML says about one GPU. Fields the GPU or driver does not report are `None`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NvmlIdentity {
    /// NVML's index (`None` for a MIG instance).
    pub index: Option<u32>,
    pub name: String,
    pub uuid: String,
    pub serial: Option<String>,
    /// NVML's spelling, e.g. `00000000:1B:00.0`.
    pub pci_bus_id: Option<String>,
    /// `major.minor`, e.g. `9.0`.
    pub compute_capability: Option<String>,
    /// Only MIG instances report it through NVML; CUDA fills it for whole GPUs.
    pub sm_count: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub driver_version: Option<String>,
    /// The CUDA version the driver supports, `major.minor`, e.g. `13.0`.
    pub cuda_driver_version: Option<String>,
    pub vbios_version: Option<String>,
    /// The enforced power limit, watts.
    pub power_limit_w: Option<f64>,
    pub ecc_enabled: Option<bool>,
    pub mig_enabled: Option<bool>,
}

/// A mode a GPU without the feature reports as `NotSupported`: the feature is then off.
fn mode_or_off(reading: Result<bool, NvmlError>) -> Option<bool> {
    match reading {
        Ok(enabled) => Some(enabled),
        Err(NvmlError::NotSupported) => Some(false),
        Err(_) => None,
    }
}

/// Reads the identity of the GPU `selector` names.
pub fn nvml_identity(selector: &DeviceSelector) -> Result<NvmlIdentity, TelemetryError> {
    let nvml = Nvml::init().map_err(|source| TelemetryError::NvmlUnavailable { source })?;
    let device = resolve_device(&nvml, selector)?;
    read_identity(&nvml, &device)
}

fn read_identity(nvml: &Nvml, device: &Device<'_>) -> Result<NvmlIdentity, TelemetryError> {
    let name = device.name().map_err(|source| TelemetryError::Query {
        what: "name",
        source,
    })?;
    let uuid = device.uuid().map_err(|source| TelemetryError::Query {
        what: "uuid",
        source,
    })?;
    let cuda_driver_version = nvml.sys_cuda_driver_version().ok().map(|v| {
        format!(
            "{}.{}",
            nvml_wrapper::cuda_driver_version_major(v),
            nvml_wrapper::cuda_driver_version_minor(v)
        )
    });
    let power_limit_mw = device
        .enforced_power_limit()
        .or_else(|_| device.power_management_limit())
        .ok();
    Ok(NvmlIdentity {
        index: device.index().ok(),
        name,
        uuid,
        serial: device.serial().ok().filter(|s| !s.trim().is_empty()),
        pci_bus_id: device.pci_info().ok().map(|pci| pci.bus_id),
        compute_capability: device
            .cuda_compute_capability()
            .ok()
            .map(|cc| format!("{}.{}", cc.major, cc.minor)),
        sm_count: device
            .attributes()
            .ok()
            .map(|a| a.multiprocessor_count)
            .filter(|n| *n > 0),
        memory_bytes: device.memory_info().ok().map(|m| m.total),
        driver_version: nvml.sys_driver_version().ok(),
        cuda_driver_version,
        vbios_version: device.vbios_version().ok(),
        power_limit_w: power_limit_mw.map(|mw| f64::from(mw) / MILLIWATTS_PER_WATT),
        ecc_enabled: mode_or_off(device.is_ecc_enabled().map(|e| e.currently_enabled)),
        mig_enabled: mode_or_off(device.mig_mode().map(|m| m.current == NVML_MIG_ENABLED)),
    })
}

fn fill_string(slot: &mut String, value: &str) {
    if slot.trim().is_empty() && !value.trim().is_empty() {
        *slot = value.to_string();
    }
}

fn fill<T: Clone>(slot: &mut Option<T>, value: &Option<T>) {
    if slot.is_none() {
        slot.clone_from(value);
    }
}

/// Fills the fields of `identity` that CUDA left empty with NVML's values; a value CUDA already
/// gave is kept.
pub fn merge_into(identity: &mut DeviceIdentity, nvml: &NvmlIdentity) {
    fill_string(&mut identity.name, &nvml.name);
    fill_string(&mut identity.uuid, &nvml.uuid);
    // The SKU used for per-SKU placement is the marketing name.
    fill_string(&mut identity.sku, &nvml.name);
    fill(&mut identity.serial, &nvml.serial);
    fill(&mut identity.pci_bus_id, &nvml.pci_bus_id);
    fill(&mut identity.compute_capability, &nvml.compute_capability);
    fill(&mut identity.sm_count, &nvml.sm_count);
    fill(&mut identity.memory_bytes, &nvml.memory_bytes);
    fill(&mut identity.driver_version, &nvml.driver_version);
    fill(&mut identity.cuda_driver_version, &nvml.cuda_driver_version);
    fill(&mut identity.vbios_version, &nvml.vbios_version);
    fill(&mut identity.power_limit_w, &nvml.power_limit_w);
    fill(&mut identity.ecc_enabled, &nvml.ecc_enabled);
    fill(&mut identity.mig_enabled, &nvml.mig_enabled);
}

/// How many GPUs NVML sees; `None` without NVML.
pub fn nvml_device_count() -> Option<u32> {
    Nvml::init().ok()?.device_count().ok()
}

/// The NVML index of the GPU with this PCI bus id or UUID (either spelling), trying the bus id
/// first. `Ok(None)` when no GPU matches.
pub fn nvml_index_for(
    pci_bus_id: Option<&str>,
    uuid: Option<&str>,
) -> Result<Option<u32>, TelemetryError> {
    let nvml = Nvml::init().map_err(|source| TelemetryError::NvmlUnavailable { source })?;
    let selectors = pci_bus_id
        .map(|b| DeviceSelector::PciBusId(b.to_string()))
        .into_iter()
        .chain(uuid.map(|u| DeviceSelector::Uuid(u.to_string())));
    for selector in selectors {
        match resolve_device(&nvml, &selector) {
            Ok(device) => return Ok(device.index().ok()),
            Err(TelemetryError::DeviceNotFound { .. }) => continue,
            Err(other) => return Err(other),
        }
    }
    Ok(None)
}

pub use decodebench_kernels::host::{first_host_name, host_name, HOST_NAME_ENV};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_bus_ids_match_across_nvml_and_cuda_spellings() {
        let nvml = PciAddress::parse("00000000:1B:00.0").unwrap();
        let cuda = PciAddress::parse("0000:1b:00.0").unwrap();
        let short = PciAddress::parse("1b:00.0").unwrap();
        assert_eq!(nvml, cuda);
        assert_eq!(nvml, short);
        assert_eq!(nvml.to_string(), "0000:1b:00.0");
        assert_ne!(nvml, PciAddress::parse("0000:1c:00.0").unwrap());
        assert_eq!(
            PciAddress::parse("0001:af:1f.7").unwrap(),
            PciAddress {
                domain: 1,
                bus: 0xaf,
                device: 0x1f,
                function: 7
            }
        );
    }

    #[test]
    fn malformed_pci_bus_ids_are_rejected() {
        for bad in [
            "",
            "1b:00",
            "zz:00.0",
            "0000:1b:00.",
            "0000:100:00.0",
            "0:0:0:0.0",
            "GPU-1",
        ] {
            assert_eq!(PciAddress::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn gpu_uuids_normalize_across_spellings() {
        let nvml = "GPU-4f3bf9a1-2c5e-7d0b-9a8e-1234567890AB";
        let bare = "4f3bf9a12c5e7d0b9a8e1234567890ab";
        assert_eq!(normalize_gpu_uuid(nvml), normalize_gpu_uuid(bare));
        assert_eq!(
            normalize_gpu_uuid(nvml).as_deref(),
            Some("4f3bf9a12c5e7d0b9a8e1234567890ab")
        );
        let mig = "MIG-4f3bf9a1-2c5e-7d0b-9a8e-1234567890ab";
        assert_ne!(normalize_gpu_uuid(mig), normalize_gpu_uuid(nvml));
        assert_eq!(normalize_gpu_uuid("GPU-1234"), None);
        assert_eq!(normalize_gpu_uuid(""), None);
    }

    #[test]
    fn selectors_parse_from_cli_text() {
        assert_eq!(
            "3".parse::<DeviceSelector>().unwrap(),
            DeviceSelector::Index(3)
        );
        let uuid = "GPU-4f3bf9a1-2c5e-7d0b-9a8e-1234567890ab";
        assert_eq!(
            uuid.parse::<DeviceSelector>().unwrap(),
            DeviceSelector::Uuid(uuid.to_string())
        );
        assert_eq!(
            "0000:1b:00.0".parse::<DeviceSelector>().unwrap(),
            DeviceSelector::PciBusId("0000:1b:00.0".to_string())
        );
        let err = "gpu zero".parse::<DeviceSelector>().unwrap_err();
        assert!(matches!(err, TelemetryError::InvalidSelector { .. }));
        assert!(err.to_string().contains("gpu zero"));
    }

    #[test]
    fn cuda_devices_map_to_bus_id_then_uuid_selectors() {
        let mut cuda = DeviceIdentity {
            uuid: "GPU-4f3bf9a1-2c5e-7d0b-9a8e-1234567890ab".to_string(),
            pci_bus_id: Some("0000:1b:00.0".to_string()),
            ..Default::default()
        };
        assert_eq!(
            DeviceSelector::for_cuda_device(&cuda),
            Some(DeviceSelector::PciBusId("0000:1b:00.0".to_string()))
        );
        cuda.pci_bus_id = None;
        assert_eq!(
            DeviceSelector::for_cuda_device(&cuda),
            Some(DeviceSelector::Uuid(cuda.uuid.clone()))
        );
        cuda.uuid.clear();
        assert_eq!(DeviceSelector::for_cuda_device(&cuda), None);
    }

    fn nvml_h100() -> NvmlIdentity {
        NvmlIdentity {
            index: Some(0),
            name: "NVIDIA H100 80GB HBM3".to_string(),
            uuid: "GPU-4f3bf9a1-2c5e-7d0b-9a8e-1234567890ab".to_string(),
            serial: Some("1650123456789".to_string()),
            pci_bus_id: Some("00000000:1B:00.0".to_string()),
            compute_capability: Some("9.0".to_string()),
            sm_count: None,
            memory_bytes: Some(85_520_809_984),
            driver_version: Some("580.82.07".to_string()),
            cuda_driver_version: Some("13.0".to_string()),
            vbios_version: Some("96.00.99.00.01".to_string()),
            power_limit_w: Some(700.0),
            ecc_enabled: Some(true),
            mig_enabled: Some(false),
        }
    }

    #[test]
    fn merge_fills_only_what_cuda_left_empty() {
        let mut identity = DeviceIdentity {
            backend: "cuda".to_string(),
            name: "NVIDIA H100 80GB HBM3 (cuda)".to_string(),
            pci_bus_id: Some("0000:1b:00.0".to_string()),
            sm_count: Some(132),
            memory_bytes: Some(84_000_000_000),
            host: "node-7".to_string(),
            ..Default::default()
        };
        let nvml = nvml_h100();
        merge_into(&mut identity, &nvml);
        // CUDA's values win.
        assert_eq!(identity.name, "NVIDIA H100 80GB HBM3 (cuda)");
        assert_eq!(identity.pci_bus_id.as_deref(), Some("0000:1b:00.0"));
        assert_eq!(identity.sm_count, Some(132));
        assert_eq!(identity.memory_bytes, Some(84_000_000_000));
        assert_eq!(identity.backend, "cuda");
        assert_eq!(identity.host, "node-7");
        // Empty ones are filled from NVML.
        assert_eq!(identity.uuid, nvml.uuid);
        assert_eq!(identity.sku, nvml.name);
        assert_eq!(identity.serial, nvml.serial);
        assert_eq!(identity.compute_capability.as_deref(), Some("9.0"));
        assert_eq!(identity.driver_version.as_deref(), Some("580.82.07"));
        assert_eq!(identity.cuda_driver_version.as_deref(), Some("13.0"));
        assert_eq!(identity.vbios_version, nvml.vbios_version);
        assert_eq!(identity.power_limit_w, Some(700.0));
        assert_eq!(identity.ecc_enabled, Some(true));
        assert_eq!(identity.mig_enabled, Some(false));
    }

    #[test]
    fn merge_never_overwrites_with_nulls_or_blanks() {
        let mut identity = DeviceIdentity {
            name: "A".to_string(),
            sm_count: Some(132),
            ..Default::default()
        };
        let blank = NvmlIdentity {
            name: "  ".to_string(),
            ..Default::default()
        };
        merge_into(&mut identity, &blank);
        assert_eq!(identity.name, "A");
        assert_eq!(identity.sm_count, Some(132));
        assert_eq!(identity.sku, "");
        assert_eq!(identity.serial, None);
    }

    #[test]
    fn modes_unsupported_by_the_gpu_read_as_off() {
        assert_eq!(mode_or_off(Ok(true)), Some(true));
        assert_eq!(mode_or_off(Err(NvmlError::NotSupported)), Some(false));
        assert_eq!(mode_or_off(Err(NvmlError::GpuLost)), None);
    }

    #[test]
    fn host_name_takes_the_first_non_blank_candidate() {
        assert_eq!(
            first_host_name([
                None,
                Some(" \n".to_string()),
                Some("gpu-node-3\n".to_string())
            ]),
            "gpu-node-3"
        );
        assert_eq!(
            first_host_name([None, None]),
            decodebench_kernels::host::UNKNOWN_HOST
        );
        assert!(!host_name().is_empty());
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU and driver: cargo test -p decodebench-agent -- --ignored"]
    fn real_gpu_identity_and_cross_spelling_lookups() {
        let id = nvml_identity(&DeviceSelector::Index(0)).expect("identity of GPU 0");
        println!("{id:?}");
        assert!(!id.name.is_empty());
        assert!(normalize_gpu_uuid(&id.uuid).is_some(), "{}", id.uuid);
        assert!(id.compute_capability.is_some());
        assert!(id.memory_bytes.is_some_and(|b| b > 0));
        assert!(id.driver_version.is_some());
        assert!(id.cuda_driver_version.is_some());
        let bus_id = id.pci_bus_id.clone().expect("PCI bus id");
        let address = PciAddress::parse(&bus_id).expect("NVML's bus id parses");
        // CUDA's spelling of the same address, and the bare UUID, find the same GPU.
        let cuda_bus_id = address.to_string();
        assert_eq!(nvml_index_for(Some(&cuda_bus_id), None).unwrap(), Some(0));
        let bare_uuid = normalize_gpu_uuid(&id.uuid).unwrap();
        assert_eq!(nvml_index_for(None, Some(&bare_uuid)).unwrap(), Some(0));
        assert_eq!(nvml_index_for(Some("0000:ff:1f.7"), None).unwrap(), None);
        assert!(nvml_device_count().is_some_and(|n| n >= 1));
    }

    #[test]
    fn nvml_lookups_fail_cleanly_without_nvml() {
        match nvml_identity(&DeviceSelector::Index(u32::MAX)) {
            Err(TelemetryError::NvmlUnavailable { .. }) => {
                assert_eq!(nvml_device_count(), None);
                assert!(matches!(
                    nvml_index_for(Some("0000:1b:00.0"), None),
                    Err(TelemetryError::NvmlUnavailable { .. })
                ));
            }
            // With a GPU: NVML opens and the bogus index is rejected.
            Err(TelemetryError::DeviceNotFound { .. }) => assert!(nvml_device_count().is_some()),
            other => panic!("unexpected: {other:?}"),
        }
    }
}
