//! Shared AWS client set-up for the publishing commands: the standard aws-config credential
//! chain and region, with an endpoint override for local stand-ins (moto) or private endpoints.
//! Only `publish` and `bundle` upload code depends on this module.

pub mod retry;

pub use retry::{with_retry, AwsError, Failure, RetryPolicy, DEFAULT_ATTEMPT_TIMEOUT};

/// Where to send requests and for which region.
#[derive(Debug, Clone, Default)]
pub struct Endpoint {
    /// Region override; otherwise the standard chain (AWS_REGION, profile, IMDS).
    pub region: Option<String>,
    /// Endpoint override (`--endpoint-url`); `AWS_ENDPOINT_URL` is honoured by aws-config itself.
    pub endpoint_url: Option<String>,
}

/// Loads the SDK configuration for one region.
pub async fn sdk_config(ep: &Endpoint) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(r) = &ep.region {
        loader = loader.region(aws_config::Region::new(r.clone()));
    }
    if let Some(u) = &ep.endpoint_url {
        loader = loader.endpoint_url(u.clone());
    }
    loader.load().await
}

/// EBS direct API client with the SDK's own retries off: [`with_retry`] decides instead.
pub fn ebs_client(conf: &aws_config::SdkConfig) -> aws_sdk_ebs::Client {
    let c = aws_sdk_ebs::config::Builder::from(conf)
        .retry_config(aws_sdk_ebs::config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_ebs::Client::from_conf(c)
}

/// EC2 client with the SDK's own retries off: [`with_retry`] decides instead.
pub fn ec2_client(conf: &aws_config::SdkConfig) -> aws_sdk_ec2::Client {
    let c = aws_sdk_ec2::config::Builder::from(conf)
        .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_ec2::Client::from_conf(c)
}

/// SSM client with the SDK's own retries off: [`with_retry`] decides instead.
pub fn ssm_client(conf: &aws_config::SdkConfig) -> aws_sdk_ssm::Client {
    let c = aws_sdk_ssm::config::Builder::from(conf)
        .retry_config(aws_sdk_ssm::config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_ssm::Client::from_conf(c)
}

/// Seconds since the Unix epoch by the wall clock: what leases, deprecation times and
/// retention windows are judged against, and never anything written into an image.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}
